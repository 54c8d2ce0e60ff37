//! Facts about, and hooks into, the machine mulmd runs on: which cores to use and how to pin
//! to them ([`cpus`]), where things are by default ([`paths`]), secrets from files and systemd
//! credentials ([`secrets`]), TLS set-up ([`tls`]), and what /proc and /sys say ([`sys`]).
//! The only room that reads /proc or /sys for the daemon.

pub mod cpus;
pub mod paths;
pub mod secrets;
pub mod sys;
pub mod tls;
