//! image-worker: takes image jobs from RabbitMQ, drives the Docker engine, discovers pyATS jobs
//! and manifests inside the image, and reports the image record back.
//!
//! `ARCHITECTURE.md` has the code map; `main.rs` only parses the command line.
pub mod broker;
pub mod build;
pub mod cache;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod engine;
pub mod http;
pub mod inflight;
pub mod job;
pub mod joblog;
pub mod lease;
pub mod metrics;
pub mod pipeline;
pub mod pull;
pub mod reference;
pub mod report;
pub mod secrets;
pub mod submit;
pub mod systemd;
