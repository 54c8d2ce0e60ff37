//! mulmd: instant openers from a micro language model on the device, continued by a cloud
//! model. The binary (`main.rs`) is a thin CLI over this library.

pub mod bench;
pub mod cloud;
pub mod config;
pub mod cpus;
pub mod engine;
pub mod grpc;
pub mod limits;
pub mod mqtt;
pub mod observe;
pub mod paths;
pub mod pipeline;
pub mod server;
pub mod systemd;
