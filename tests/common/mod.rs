//! Shared helpers for the end-to-end tests: the real Docker engine, RabbitMQ and registries.
#![allow(dead_code)]
pub mod expected;
