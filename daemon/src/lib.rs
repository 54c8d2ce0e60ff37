//! mulmd: instant openers from a micro language model on the device, continued by a cloud
//! model. The binary (`main.rs`) parses the command line and calls [`cli`].
//!
//! Where to look:
//!
//! | question | module |
//! |---|---|
//! | what does a subcommand (`ask`, `serve`, `bench`…) do and print | [`cli`], one file each |
//! | how is an answer composed (DESIGN.md's pipeline); which requests are taken | [`answer`] (`compose`, `admission`) |
//! | what goes over gRPC / MQTT / HTTP (Ollama, OpenAI) | [`grpc`], [`mqtt`], [`http`] (translators of [`answer::Events`]) |
//! | how the daemon starts and stops; systemd | [`daemon`] |
//! | how the cloud is asked to continue; what it may send | [`cloud`] |
//! | how an opener is written; model loading | [`engine`] (serving path at the top) |
//! | why decode is fast | `engine::ops` (kernels), `engine::load` (graph rewrites) |
//! | what a Prometheus scrape shows | [`metrics`] (recorded by `answer::tap`) |
//! | what a key means and its default | [`config`] (`default.toml`) |
//! | cores, paths, secrets, TLS, /proc and /sys | [`host`] |
//! | the paper's benchmark and energy meters | [`bench`] |

pub mod answer;
pub mod bench;
pub mod cli;
pub mod cloud;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod grpc;
pub mod host;
pub mod http;
pub mod metrics;
pub mod mqtt;
