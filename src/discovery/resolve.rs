//! Symlink resolution inside an image, never on the host: component by component against the
//! image's own tree, absolute targets re-rooted at the image root, `..` clamped there, at most
//! `MAX_HOPS` links. Sources drive it with their own lookups (a merged layer view, or archive
//! requests), so both resolve the same way.

use std::collections::VecDeque;
use std::fmt;

use super::rules::{is_runtime_path, join};

/// Like Linux's MAXSYMLINKS.
pub const MAX_HOPS: usize = 40;

/// What one path (not following a final symlink) is in the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Node {
    Dir,
    File {
        size: u64,
    },
    Symlink {
        target: String,
    },
    /// Devices, fifos, sockets.
    Other,
    Missing,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ResolveError {
    NotFound,
    Loop,
    NotADirectory(String),
    RuntimePath(String),
    IsADirectory,
    NotAFile,
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound => f.write_str("not found in the image"),
            Self::Loop => write!(f, "more than {MAX_HOPS} symlinks (a loop?)"),
            Self::NotADirectory(p) => write!(f, "{p} is not a directory"),
            Self::RuntimePath(p) => write!(f, "{p} is a container runtime path, not image content"),
            Self::IsADirectory => f.write_str("is a directory"),
            Self::NotAFile => f.write_str("is not a regular file"),
        }
    }
}

/// A resolution in progress. `next()` names the path to look up; `feed()` gives its node.
#[derive(Debug)]
pub(crate) struct Resolution {
    resolved: String,
    pending: VecDeque<String>,
    candidate: Option<String>,
    hops: usize,
    last: Option<Node>,
}

impl Resolution {
    pub(crate) fn new(path: &str) -> Self {
        let mut r = Self {
            resolved: "/".into(),
            pending: VecDeque::new(),
            candidate: None,
            hops: 0,
            last: None,
        };
        r.push_front(path);
        r
    }

    fn push_front(&mut self, path: &str) {
        for part in path.split('/').rev().filter(|p| !p.is_empty()) {
            self.pending.push_front(part.to_owned());
        }
    }

    /// The next path to look up, or `None` when the resolution is complete.
    pub(crate) fn next(&mut self) -> Result<Option<String>, ResolveError> {
        while let Some(part) = self.pending.pop_front() {
            match part.as_str() {
                "." => {}
                ".." => {
                    self.resolved = parent(&self.resolved).to_owned();
                    self.last = Some(Node::Dir);
                }
                name => {
                    let candidate = join(&self.resolved, name);
                    if is_runtime_path(&candidate) {
                        return Err(ResolveError::RuntimePath(candidate));
                    }
                    self.candidate = Some(candidate.clone());
                    return Ok(Some(candidate));
                }
            }
        }
        Ok(None)
    }

    pub(crate) fn feed(&mut self, node: Node) -> Result<(), ResolveError> {
        let candidate = self.candidate.take().expect("feed() follows next()");
        match node {
            Node::Missing => return Err(ResolveError::NotFound),
            Node::Symlink { target } => {
                self.hops += 1;
                if self.hops > MAX_HOPS {
                    return Err(ResolveError::Loop);
                }
                if target.starts_with('/') {
                    self.resolved = "/".into();
                }
                self.push_front(&target);
                self.last = Some(Node::Dir);
            }
            Node::Dir => {
                self.resolved = candidate;
                self.last = Some(Node::Dir);
            }
            other => {
                if !self.pending.iter().all(|p| p == ".") {
                    return Err(ResolveError::NotADirectory(candidate));
                }
                self.resolved = candidate;
                self.last = Some(other);
            }
        }
        Ok(())
    }

    /// The resolved path, when it is a directory.
    pub(crate) fn into_dir(self) -> Option<String> {
        matches!(self.last, Some(Node::Dir) | None).then_some(self.resolved)
    }

    /// The resolved path of a regular file, and its size.
    pub(crate) fn into_file(self) -> Result<(String, u64), ResolveError> {
        match self.last {
            Some(Node::File { size }) => Ok((self.resolved, size)),
            Some(Node::Dir) | None => Err(ResolveError::IsADirectory),
            Some(_) => Err(ResolveError::NotAFile),
        }
    }
}

fn parent(path: &str) -> &str {
    match path.trim_end_matches('/').rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// Resolves `path` to a regular file with a synchronous lookup.
pub(crate) fn resolve_file(
    path: &str,
    mut lookup: impl FnMut(&str) -> std::io::Result<Node>,
) -> Result<Result<(String, u64), ResolveError>, std::io::Error> {
    let mut r = Resolution::new(path);
    loop {
        match r.next() {
            Ok(Some(p)) => {
                let node = lookup(&p)?;
                if let Err(e) = r.feed(node) {
                    return Ok(Err(e));
                }
            }
            Ok(None) => return Ok(r.into_file()),
            Err(e) => return Ok(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn tree(entries: &[(&str, Node)]) -> HashMap<String, Node> {
        let mut t: HashMap<String, Node> = entries
            .iter()
            .map(|(p, n)| (p.to_string(), n.clone()))
            .collect();
        for (p, _) in entries {
            let mut d = parent(p);
            while d != "/" {
                t.entry(d.to_string()).or_insert(Node::Dir);
                d = parent(d);
            }
        }
        t
    }

    fn link(target: &str) -> Node {
        Node::Symlink {
            target: target.into(),
        }
    }

    fn resolve(t: &HashMap<String, Node>, path: &str) -> Result<String, ResolveError> {
        resolve_file(path, |p| Ok(t.get(p).cloned().unwrap_or(Node::Missing)))
            .unwrap()
            .map(|(p, _)| p)
    }

    #[test]
    fn follows_absolute_and_relative_links_inside_the_image() {
        let t = tree(&[
            ("/etc/shadow", Node::File { size: 3 }),
            ("/pyats/link/abs.tem", link("/etc/shadow")),
            ("/pyats/link/rel.tem", link("../other/x.tem")),
            ("/pyats/other/x.tem", Node::File { size: 1 }),
            ("/pyats/link/chain.tem", link("rel.tem")),
            ("/pyats/dirlink", link("/pyats/other")),
            ("/pyats/link/viadir.tem", link("/pyats/dirlink/x.tem")),
        ]);
        assert_eq!(resolve(&t, "/pyats/link/abs.tem"), Ok("/etc/shadow".into()));
        assert_eq!(
            resolve(&t, "/pyats/link/rel.tem"),
            Ok("/pyats/other/x.tem".into())
        );
        assert_eq!(
            resolve(&t, "/pyats/link/chain.tem"),
            Ok("/pyats/other/x.tem".into())
        );
        assert_eq!(
            resolve(&t, "/pyats/link/viadir.tem"),
            Ok("/pyats/other/x.tem".into())
        );
        assert_eq!(
            resolve(&t, "/pyats/dirlink/x.tem"),
            Ok("/pyats/other/x.tem".into())
        );
    }

    #[test]
    fn dot_dot_clamps_at_the_image_root() {
        let t = tree(&[
            ("/etc/shadow", Node::File { size: 3 }),
            ("/pyats/link/up.tem", link("../../../../../etc/shadow")),
            ("/pyats/link/up2.tem", link("/../../etc/./shadow")),
        ]);
        assert_eq!(resolve(&t, "/pyats/link/up.tem"), Ok("/etc/shadow".into()));
        assert_eq!(resolve(&t, "/pyats/link/up2.tem"), Ok("/etc/shadow".into()));
    }

    #[test]
    fn failures() {
        let t = tree(&[
            ("/pyats/dangling.tem", link("/etc/machine-id")),
            ("/pyats/loop.tem", link("loop.tem")),
            ("/pyats/a.tem", link("b.tem")),
            ("/pyats/b.tem", link("a.tem")),
            ("/pyats/runtime.tem", link("/etc/hostname")),
            ("/pyats/mtab.tem", link("/etc/mtab")),
            ("/pyats/dir.tem", link("/pyats")),
            ("/pyats/file", Node::File { size: 1 }),
            ("/pyats/through.tem", link("/pyats/file/x")),
            ("/pyats/dev.tem", link("/dev/null")),
            ("/pyats/fifo", Node::Other),
            ("/etc/passwd", Node::File { size: 1 }),
        ]);
        assert_eq!(
            resolve(&t, "/pyats/dangling.tem"),
            Err(ResolveError::NotFound)
        );
        assert_eq!(resolve(&t, "/pyats/loop.tem"), Err(ResolveError::Loop));
        assert_eq!(resolve(&t, "/pyats/a.tem"), Err(ResolveError::Loop));
        assert_eq!(
            resolve(&t, "/pyats/runtime.tem"),
            Err(ResolveError::RuntimePath("/etc/hostname".into()))
        );
        assert_eq!(
            resolve(&t, "/pyats/mtab.tem"),
            Err(ResolveError::RuntimePath("/etc/mtab".into()))
        );
        assert_eq!(
            resolve(&t, "/pyats/dev.tem"),
            Err(ResolveError::RuntimePath("/dev".into()))
        );
        assert_eq!(
            resolve(&t, "/pyats/dir.tem"),
            Err(ResolveError::IsADirectory)
        );
        assert_eq!(
            resolve(&t, "/pyats/through.tem"),
            Err(ResolveError::NotADirectory("/pyats/file".into()))
        );
        assert_eq!(resolve(&t, "/pyats/fifo"), Err(ResolveError::NotAFile));
    }

    #[test]
    fn forty_hops_is_the_limit() {
        let mut entries = vec![("/f".to_string(), Node::File { size: 0 })];
        for i in 0..MAX_HOPS {
            let target = if i == 0 {
                "/f".to_string()
            } else {
                format!("/l{}", i - 1)
            };
            entries.push((format!("/l{i}"), link(&target)));
        }
        let t: HashMap<String, Node> = entries.into_iter().collect();
        let last = format!("/l{}", MAX_HOPS - 1);
        assert_eq!(resolve(&t, &last), Ok("/f".into()));
        let mut t2 = t.clone();
        t2.insert("/l40".into(), link(&last));
        assert_eq!(resolve(&t2, "/l40"), Err(ResolveError::Loop));
    }
}
