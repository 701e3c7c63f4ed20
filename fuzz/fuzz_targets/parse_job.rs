//! Any bytes as a job message: `parse_job` returns (a job, an invalid job or a rejection) and
//! never panics, and the same bytes always give the same outcome.
#![no_main]

use image_worker::job::parse_job;
use libfuzzer_sys::fuzz_target;

/// The default `jobs.max_message_bytes`.
const MAX_MESSAGE_BYTES: usize = 1 << 20;

fn outcome(data: &[u8]) -> String {
    match parse_job(data, MAX_MESSAGE_BYTES) {
        Ok(Ok(job)) => format!("job {job:?}"),
        Ok(Err(invalid)) => format!("invalid {} {}", invalid.uuid, invalid.message),
        Err(rejection) => format!("dead {rejection}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let first = outcome(data);
    assert_eq!(first, outcome(data), "parse_job is not deterministic");
    // A job that parsed keeps the uuid it was sent with, in canonical form.
    if let Ok(Ok(job)) = parse_job(data, MAX_MESSAGE_BYTES) {
        assert!(uuid::Uuid::parse_str(&job.uuid).is_ok());
        assert!(!job.name.is_empty() && !job.group.is_empty());
    }
});
