//! The worker's image cache on the engine: images it pulled or built stay for `pin_version`
//! jobs, under a budget (`cache.max_bytes`, `cache.min_free_bytes`). Over it, the least
//! recently used of those images are removed first, never one a running job holds, and never an
//! image this worker did not bring (the host's other images are not ours to delete).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use bollard::Docker;
use bollard::query_parameters::{ListImagesOptions, RemoveImageOptionsBuilder};

use crate::config::CacheConfig;

#[derive(Debug, Clone)]
struct Entry {
    last_used: Instant,
    size: u64,
    holds: usize,
}

#[derive(Default)]
pub struct ImageCache {
    images: Mutex<HashMap<String, Entry>>,
    /// One enforcement at a time.
    enforcing: tokio::sync::Mutex<()>,
}

impl ImageCache {
    /// A job uses `image_id` (of `size` bytes) from now until [`ImageCache::release`].
    pub fn hold(&self, image_id: &str, size: u64) {
        let mut images = self.images.lock().unwrap();
        let e = images.entry(image_id.to_string()).or_insert(Entry {
            last_used: Instant::now(),
            size,
            holds: 0,
        });
        e.last_used = Instant::now();
        e.size = size;
        e.holds += 1;
    }

    pub fn release(&self, image_id: &str) {
        if let Some(e) = self.images.lock().unwrap().get_mut(image_id) {
            e.holds = e.holds.saturating_sub(1);
            e.last_used = Instant::now();
        }
    }

    /// Which images to remove so that what this worker brought fits in `max_bytes` and
    /// `need_free` more bytes are freed: least recently used first, held ones never.
    fn plan(&self, max_bytes: Option<u64>, need_free: u64) -> Vec<(String, u64)> {
        let images = self.images.lock().unwrap();
        let mut total: u64 = images.values().map(|e| e.size).sum();
        let mut candidates: Vec<(&String, &Entry)> =
            images.iter().filter(|(_, e)| e.holds == 0).collect();
        candidates.sort_by_key(|(_, e)| e.last_used);
        let mut freed = 0;
        let mut out = Vec::new();
        for (id, e) in candidates {
            let over_budget = max_bytes.is_some_and(|max| total > max);
            if !over_budget && freed >= need_free {
                break;
            }
            out.push((id.clone(), e.size));
            total -= e.size;
            freed += e.size;
        }
        out
    }

    /// Removes images until the budget holds. Errors are logged, never fatal.
    pub async fn enforce(&self, docker: &Docker, config: &CacheConfig) {
        if config.max_bytes == 0 && config.min_free_bytes == 0 {
            return;
        }
        let _one = self.enforcing.lock().await;
        let docker_root = if config.min_free_bytes > 0 {
            docker.info().await.ok().and_then(|i| i.docker_root_dir)
        } else {
            None
        };
        // Forget images removed by someone else, so they do not count against the budget.
        if let Ok(present) = docker.list_images(None::<ListImagesOptions>).await {
            let present: std::collections::HashSet<String> =
                present.into_iter().map(|i| i.id).collect();
            self.images
                .lock()
                .unwrap()
                .retain(|id, e| e.holds > 0 || present.contains(id));
        }
        let need_free = match docker_root.as_deref().and_then(free_bytes) {
            Some(free) if config.min_free_bytes > free => config.min_free_bytes - free,
            _ => 0,
        };
        let max = (config.max_bytes > 0).then_some(config.max_bytes);
        for (id, size) in self.plan(max, need_free) {
            let options = RemoveImageOptionsBuilder::default().force(true).build();
            match docker.remove_image(&id, Some(options), None).await {
                Ok(_) => {
                    self.images.lock().unwrap().remove(&id);
                    tracing::info!(image = %id, bytes = size, "image cache over budget: removed the least recently used image");
                }
                Err(e) => {
                    tracing::warn!(image = %id, error = %e, "image cache: cannot remove image");
                    // Do not try it again and again: it leaves the worker's cache.
                    self.images.lock().unwrap().remove(&id);
                }
            }
        }
    }

    pub fn tracked(&self) -> Vec<String> {
        self.images.lock().unwrap().keys().cloned().collect()
    }
}

/// Free bytes on the filesystem holding `path`.
fn free_bytes(path: &str) -> Option<u64> {
    let c = std::ffi::CString::new(path).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `s` a valid out-pointer for the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    (rc == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_and_never_held_images() {
        let cache = ImageCache::default();
        cache.hold("old", 100);
        cache.release("old");
        cache.hold("held", 100); // a running job's image: never evicted
        std::thread::sleep(std::time::Duration::from_millis(5));
        cache.hold("mid", 100);
        cache.release("mid");
        std::thread::sleep(std::time::Duration::from_millis(5));
        cache.hold("new", 100);
        cache.release("new");
        // 400 bytes against a budget of 250: the two oldest not held go.
        let plan: Vec<String> = cache
            .plan(Some(250), 0)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(plan, vec!["old", "mid"]);
        // Within budget, nothing goes; a free-space need takes the oldest first.
        assert!(cache.plan(Some(1000), 0).is_empty());
        let plan: Vec<String> = cache
            .plan(None, 150)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(plan, vec!["old", "mid"]);
        // Even an impossible budget never takes the held image.
        let plan: Vec<String> = cache
            .plan(Some(0), 0)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(plan, vec!["old", "mid", "new"]);
    }

    #[test]
    fn free_space_of_a_real_path() {
        assert!(free_bytes("/").is_some_and(|b| b > 0));
        assert_eq!(free_bytes("/nonexistent/path"), None);
    }
}
