//! image-worker: takes image jobs from RabbitMQ, drives the Docker engine, discovers pyATS jobs
//! and manifests inside the image, and reports the image record back.
pub mod discovery;
