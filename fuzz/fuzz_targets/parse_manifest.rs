//! Any bytes as a `.tem` manifest: `parse_manifest` returns a manifest or the reason it is broken
//! (a warning in the report), never panics; a manifest always has its DEFAULT profile first.
#![no_main]

use image_worker::discovery::{DEFAULT_PROFILE, parse_manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = parse_manifest("/pyats/fuzz/fuzz_job.tem", data) {
        assert_eq!(manifest.profiles[0].name, DEFAULT_PROFILE);
        assert_eq!(manifest.job_file, "/pyats/fuzz/fuzz_job.py");
        // The report serializes it.
        serde_json::to_vec(&manifest).expect("a manifest serializes");
    }
});
