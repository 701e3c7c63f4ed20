//! Replays the fuzzing corpora (`fuzz/corpus/<target>/`, kept small with `cargo fuzz cmin`) and
//! the bad-message corpus through both parsers on stable Rust, without cargo-fuzz: every input
//! returns without panicking, and gives the same outcome twice.
//! Crash inputs (`fuzz/artifacts/`) are not replayed here: each is a reported bug, not a test.

use std::path::{Path, PathBuf};

use image_worker::discovery::{DEFAULT_PROFILE, parse_manifest};
use image_worker::job::parse_job;

const MAX_MESSAGE_BYTES: usize = 1 << 20;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Everything `parse_job` decided, as text (Job has no `PartialEq`; its Debug hides the
/// password, so the raw message is compared as well).
fn job_outcome(data: &[u8]) -> String {
    match parse_job(data, MAX_MESSAGE_BYTES) {
        Ok(Ok(job)) => format!(
            "job {job:?} discover={} pin={} platform={:?} digest={:?} timeout={:?} raw={}",
            job.discover,
            job.pin_version,
            job.platform,
            job.digest,
            job.timeout_s,
            serde_json::Value::Object(job.raw.clone())
        ),
        Ok(Err(invalid)) => format!(
            "invalid {} {} {} raw={}",
            invalid.uuid,
            invalid.job_type.as_str(),
            invalid.message,
            serde_json::Value::Object(invalid.raw.clone())
        ),
        Err(rejection) => format!("dead {rejection}"),
    }
}

fn replay(path: &Path) -> (String, bool) {
    let data = std::fs::read(path).unwrap();
    let first = job_outcome(&data);
    assert_eq!(
        first,
        job_outcome(&data),
        "{}: parse_job is not deterministic",
        path.display()
    );
    let file = "/pyats/corpus/corpus_job.tem";
    let manifest = parse_manifest(file, &data);
    assert_eq!(
        manifest,
        parse_manifest(file, &data),
        "{}: parse_manifest is not deterministic",
        path.display()
    );
    if let Ok(m) = &manifest {
        assert_eq!(m.profiles[0].name, DEFAULT_PROFILE);
        assert_eq!(m.job_file, "/pyats/corpus/corpus_job.py");
    }
    (first, manifest.is_ok())
}

#[test]
fn fuzz_corpora_replay_through_both_parsers() {
    for target in ["parse_job", "parse_manifest"] {
        let files = files_in(&root().join("fuzz/corpus").join(target));
        assert!(files.len() >= 10, "{target}: only {} inputs", files.len());
        let (mut jobs, mut invalid, mut dead, mut manifests) = (0, 0, 0, 0);
        for path in &files {
            let (outcome, manifest_ok) = replay(path);
            match outcome.split_whitespace().next() {
                Some("job") => jobs += 1,
                Some("invalid") => invalid += 1,
                _ => dead += 1,
            }
            manifests += usize::from(manifest_ok);
        }
        eprintln!(
            "{target}: {} inputs: {jobs} jobs, {invalid} invalid jobs, {dead} rejections, \
             {manifests} valid manifests",
            files.len()
        );
        // The fuzzer found its way past the first checks of its own parser.
        match target {
            "parse_job" => assert!(jobs + invalid > 0, "no input reached validation"),
            _ => assert!(manifests > 0, "no input is a valid manifest"),
        }
    }
}

#[test]
fn bad_message_corpus_replays_through_both_parsers() {
    let files: Vec<PathBuf> = files_in(&root().join("tests/corpus/messages"))
        .into_iter()
        .filter(|p| p.file_name().unwrap() != "index.tsv")
        .collect();
    assert!(files.len() >= 30);
    for path in files {
        replay(&path);
    }
}
