//! The `layers` source: the engine's overlay layer directories on this host, read in place.
//!
//! Layers are searched top first; a path in an upper layer hides the same path below. Both
//! whiteout encodings are honoured: AUFS-style `.wh.<name>` files and `.wh..wh..opq` (what the
//! engine writes for fuse-overlayfs), and kernel overlayfs's 0/0 character devices and `opaque`
//! xattrs (overlay2). Nothing is ever opened through a symlink on the host: links are resolved
//! inside the image by `resolve`, and every open uses `O_NOFOLLOW`.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, BufReader};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use walkdir::WalkDir;

use super::findings::{Findings, Interest};
use super::resolve::{Node, resolve_file};
use super::rules::{is_runtime_path, jobfiles_txt, join};

const DRIVERS: &[&str] = &["overlay2", "fuse-overlayfs"];
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const OPAQUE_XATTRS: &[&str] = &[
    "trusted.overlay.opaque",
    "user.overlay.opaque",
    "user.fuseoverlayfs.opaque",
];

/// The layer directories of one image, top first.
#[derive(Debug, Clone)]
pub(crate) struct LayerView {
    layers: Vec<PathBuf>,
}

impl LayerView {
    /// Whether the image's storage can be read in place: a supported driver, its `UpperDir` and
    /// `LowerDir` known and readable here. The error says why not.
    pub(crate) fn from_driver(name: &str, data: &HashMap<String, String>) -> Result<Self, String> {
        if !DRIVERS.contains(&name) {
            return Err(format!("storage driver {name:?} is not one of {DRIVERS:?}"));
        }
        let upper = data
            .get("UpperDir")
            .filter(|d| !d.is_empty())
            .ok_or("the engine reports no UpperDir")?;
        let mut layers = vec![PathBuf::from(upper)];
        if let Some(lower) = data.get("LowerDir") {
            layers.extend(
                lower
                    .split(':')
                    .filter(|d| !d.is_empty())
                    .map(PathBuf::from),
            );
        }
        for dir in &layers {
            fs::read_dir(dir).map_err(|e| {
                format!(
                    "layer directory {} is not readable here: {e}",
                    dir.display()
                )
            })?;
        }
        Ok(Self { layers })
    }

    #[cfg(test)]
    pub(crate) fn new(layers: Vec<PathBuf>) -> Self {
        Self { layers }
    }

    fn host(layer: &Path, path: &str) -> PathBuf {
        layer.join(path.trim_start_matches('/'))
    }

    /// What `path` is in the merged image (a final symlink is not followed), and the host file
    /// holding it. The parents of `path` must already be directories in the merged view.
    pub(crate) fn lookup(&self, path: &str) -> io::Result<(Node, Option<PathBuf>)> {
        for layer in &self.layers {
            let host = Self::host(layer, path);
            match fs::symlink_metadata(&host) {
                Ok(meta) if is_whiteout_device(&meta) => return Ok((Node::Missing, None)),
                Ok(meta) => return Ok((node_of(&host, &meta)?, Some(host))),
                Err(e) if is_absent(&e) => {}
                Err(e) => return Err(e),
            }
            if hides_lower(layer, path)? {
                break;
            }
        }
        Ok((Node::Missing, None))
    }

    /// Resolves `path` to a regular file inside the image and opens it on the host.
    pub(crate) fn open_file(&self, path: &str) -> io::Result<Result<(File, u64), String>> {
        let resolved = resolve_file(path, |p| self.lookup(p).map(|(node, _)| node))?;
        let (target, size) = match resolved {
            Ok(found) => found,
            Err(e) => return Ok(Err(e.to_string())),
        };
        match self.lookup(&target)? {
            (Node::File { .. }, Some(host)) => Ok(Ok((open_no_follow(&host)?, size))),
            _ => Ok(Err("changed while being read".into())),
        }
    }

    /// Walks the merged tree under `root` and hands every visible file to `findings`.
    pub(crate) fn scan(&self, findings: &mut Findings) -> io::Result<()> {
        let root = findings.rules.root().to_owned();
        let walk_root = match resolve_dir(self, &root)? {
            Some(dir) => dir,
            None => {
                findings.warn(&root, "workspace root not found in the image");
                return Ok(());
            }
        };
        if let Ok(mut file) = self.open_file(&jobfiles_txt(&root))? {
            findings.jobfiles_txt(&mut file.0);
        }
        for entry in self.merged_files(&walk_root, &root, findings)? {
            self.visit(entry, findings)?;
        }
        Ok(())
    }

    fn visit(&self, entry: Visible, findings: &mut Findings) -> io::Result<()> {
        let path = entry.path.as_str();
        findings.count_file(path);
        let interest = Findings::interest(path);
        if interest == Interest::None {
            return Ok(());
        }
        let (file, size) = if entry.meta.file_type().is_file() {
            (open_no_follow(&entry.host)?, entry.meta.len())
        } else if entry.meta.file_type().is_symlink() {
            match self.open_file(path)? {
                Ok(found) => found,
                Err(reason) => {
                    let target = fs::read_link(&entry.host)?;
                    findings.warn(
                        path,
                        format_args!("symlink to {}: {reason}", target.to_string_lossy()),
                    );
                    return Ok(());
                }
            }
        } else {
            findings.warn(path, "not a regular file");
            return Ok(());
        };
        match interest {
            Interest::Job => findings.job_file(path, &mut BufReader::new(file)),
            Interest::Manifest => findings.manifest(path, size, file),
            Interest::None => {}
        }
        Ok(())
    }

    /// The visible non-directory entries under `walk_root` (reported under `root`), skipped trees
    /// pruned, whiteouts applied.
    fn merged_files(
        &self,
        walk_root: &str,
        root: &str,
        findings: &Findings,
    ) -> io::Result<Vec<Visible>> {
        let mut seen: HashMap<String, bool> = HashMap::new(); // path → is a directory
        let mut hidden: HashSet<String> = HashSet::new(); // whited out, with all below
        let mut opaque: HashSet<String> = HashSet::new(); // everything below hidden
        let mut visible = Vec::new();
        for layer in &self.layers {
            let layer_root = Self::host(layer, walk_root);
            let root_meta = match fs::symlink_metadata(&layer_root) {
                Ok(meta) => Some(meta),
                Err(e) if is_absent(&e) => None,
                Err(e) => return Err(e),
            };
            let stop_below = hides_lower(layer, walk_root)?
                || root_meta
                    .as_ref()
                    .is_some_and(|m| !m.is_dir() || is_opaque(&layer_root, m));
            if root_meta.as_ref().is_some_and(Metadata::is_dir) {
                let (mut new_hidden, mut new_opaque) = (Vec::new(), Vec::new());
                let hidden_above = |path: &str, is_dir: bool| -> bool {
                    match seen.get(path) {
                        Some(false) => return true,
                        Some(true) => return !is_dir,
                        None => {}
                    }
                    if hidden.contains(path) {
                        return true;
                    }
                    let mut dir = path;
                    while let Some(i) = dir.rfind('/') {
                        dir = &dir[..i];
                        if dir.len() < root.len() {
                            break;
                        }
                        if opaque.contains(dir)
                            || hidden.contains(dir)
                            || seen.get(dir) == Some(&false)
                        {
                            return true;
                        }
                    }
                    false
                };
                let walker = WalkDir::new(&layer_root)
                    .follow_links(false)
                    .follow_root_links(false)
                    .min_depth(1);
                let mut entries = walker.into_iter().filter_entry(|e| {
                    let path = reported(root, &layer_root, e.path());
                    !(e.file_type().is_dir()
                        && (findings.rules.is_skipped_dir(&path) || hidden_above(&path, true)))
                });
                let mut layer_seen = Vec::new();
                while let Some(entry) = entries.next().transpose()? {
                    let path = reported(root, &layer_root, entry.path());
                    let name = entry.file_name().to_string_lossy();
                    if let Some(hidden_name) = name.strip_prefix(WHITEOUT_PREFIX) {
                        let dir = path.rsplit_once('/').map_or("", |(d, _)| d).to_owned();
                        if name == OPAQUE_MARKER {
                            new_opaque.push(dir);
                        } else if !hidden_name.starts_with(WHITEOUT_PREFIX) {
                            new_hidden.push(join(&dir, hidden_name));
                        }
                        continue;
                    }
                    let meta = entry.metadata().map_err(io::Error::other)?;
                    if is_whiteout_device(&meta) {
                        new_hidden.push(path);
                        continue;
                    }
                    let is_dir = meta.is_dir();
                    if is_dir && is_opaque(entry.path(), &meta) {
                        new_opaque.push(path.clone());
                    }
                    if hidden_above(&path, is_dir) {
                        continue;
                    }
                    if !seen.contains_key(&path) {
                        layer_seen.push((path.clone(), is_dir));
                    }
                    if !is_dir && !is_runtime_path(&path) {
                        visible.push(Visible {
                            path,
                            host: entry.path().to_owned(),
                            meta,
                        });
                    }
                }
                seen.extend(layer_seen);
                hidden.extend(new_hidden);
                opaque.extend(new_opaque);
            }
            if stop_below {
                break;
            }
        }
        Ok(visible)
    }
}

struct Visible {
    path: String,
    host: PathBuf,
    meta: Metadata,
}

/// The absolute path in the image of a host path under `layer_root`, reported under `root`.
fn reported(root: &str, layer_root: &Path, host: &Path) -> String {
    let rel = host.strip_prefix(layer_root).unwrap_or(host);
    join(root, &rel.to_string_lossy())
}

/// Follows symlinks in the root path itself; `None` when it is not a directory in the image.
fn resolve_dir(view: &LayerView, root: &str) -> io::Result<Option<String>> {
    let mut r = super::resolve::Resolution::new(root);
    loop {
        match r.next() {
            Ok(Some(p)) => {
                let (node, _) = view.lookup(&p)?;
                if r.feed(node).is_err() {
                    return Ok(None);
                }
            }
            Ok(None) => return Ok(r.into_dir()),
            Err(_) => return Ok(None),
        }
    }
}

/// Whether `layer` hides, from the layers below it, `path` or a directory above it: a whiteout,
/// an opaque directory, or a non-directory on the way.
fn hides_lower(layer: &Path, path: &str) -> io::Result<bool> {
    let mut dir = String::new();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        let dir_host = LayerView::host(layer, if dir.is_empty() { "/" } else { &dir });
        match fs::symlink_metadata(&dir_host) {
            Ok(meta) if !meta.is_dir() => return Ok(true),
            Ok(meta) if is_opaque(&dir_host, &meta) => return Ok(true),
            Ok(_) => {}
            Err(e) if is_absent(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
        if exists(&dir_host.join(format!("{WHITEOUT_PREFIX}{part}")))? {
            return Ok(true);
        }
        dir.push('/');
        dir.push_str(part);
        if i + 1 == parts.len() {
            break;
        }
    }
    Ok(false)
}

fn node_of(host: &Path, meta: &Metadata) -> io::Result<Node> {
    let ft = meta.file_type();
    Ok(if ft.is_dir() {
        Node::Dir
    } else if ft.is_file() {
        Node::File { size: meta.len() }
    } else if ft.is_symlink() {
        Node::Symlink {
            target: fs::read_link(host)?.to_string_lossy().into_owned(),
        }
    } else {
        Node::Other
    })
}

fn is_whiteout_device(meta: &Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

fn is_opaque(dir: &Path, meta: &Metadata) -> bool {
    meta.is_dir()
        && (dir.join(OPAQUE_MARKER).symlink_metadata().is_ok()
            || OPAQUE_XATTRS.iter().any(|name| xattr_is_y(dir, name)))
}

fn xattr_is_y(path: &Path, name: &str) -> bool {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let (Ok(path), Ok(name)) = (
        CString::new(path.as_os_str().as_bytes()),
        CString::new(name),
    ) else {
        return false;
    };
    let mut value = [0u8; 2];
    // SAFETY: both strings are NUL-terminated and live for the call; the buffer length is exact.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

fn exists(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if is_absent(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

fn is_absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

fn open_no_follow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::rules::CompiledRules;
    use crate::discovery::{Discovery, JobRules, Source};
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const JOB: &str = "def main(runtime):\n    pass\n";

    /// A fresh directory for one synthetic image (removed when dropped).
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "iw-layers-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn layer(&self, name: &str) -> PathBuf {
            let dir = self.0.join(name);
            fs::create_dir_all(&dir).unwrap();
            dir
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn file(layer: &Path, path: &str, text: &str) {
        let host = LayerView::host(layer, path);
        fs::create_dir_all(host.parent().unwrap()).unwrap();
        fs::write(host, text).unwrap();
    }

    fn dir(layer: &Path, path: &str) -> PathBuf {
        let host = LayerView::host(layer, path);
        fs::create_dir_all(&host).unwrap();
        host
    }

    fn symlink(layer: &Path, path: &str, target: &str) {
        let host = LayerView::host(layer, path);
        fs::create_dir_all(host.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, host).unwrap();
    }

    fn c(path: &Path) -> CString {
        CString::new(path.as_os_str().as_bytes()).unwrap()
    }

    /// overlay2's whiteout: a 0/0 character device (needs root, as the worker has).
    fn char_whiteout(layer: &Path, path: &str) {
        let host = LayerView::host(layer, path);
        fs::create_dir_all(host.parent().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mknod does not retain it.
        let rc = unsafe {
            libc::mknod(
                c(&host).as_ptr(),
                libc::S_IFCHR | 0o600,
                libc::makedev(0, 0),
            )
        };
        assert_eq!(
            rc,
            0,
            "mknod {}: {}",
            host.display(),
            io::Error::last_os_error()
        );
    }

    /// overlay2's opaque directory: `trusted.overlay.opaque=y`.
    fn xattr_opaque(layer: &Path, path: &str) {
        let host = dir(layer, path);
        let name = CString::new("trusted.overlay.opaque").unwrap();
        // SAFETY: valid NUL-terminated strings and a 1-byte value buffer.
        let rc = unsafe {
            libc::lsetxattr(c(&host).as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0)
        };
        assert_eq!(
            rc,
            0,
            "setxattr {}: {}",
            host.display(),
            io::Error::last_os_error()
        );
    }

    fn discover(layers: Vec<PathBuf>) -> Discovery {
        let rules = CompiledRules::new(&JobRules::default(), "/pyats").unwrap();
        let mut findings = Findings::new(rules, 1 << 20);
        LayerView::new(layers).scan(&mut findings).unwrap();
        findings.finish(Source::Layers)
    }

    /// The same lower layer for both whiteout encodings.
    fn lower(scratch: &Scratch) -> PathBuf {
        let lower = scratch.layer("lower");
        file(&lower, "/pyats/a/gone_job.py", JOB);
        file(&lower, "/pyats/a/stay_job.py", JOB);
        file(&lower, "/pyats/opq/old_job.py", JOB);
        file(&lower, "/pyats/wiped/inside_job.py", JOB);
        file(&lower, "/pyats/dir_to_file/x_job.py", JOB);
        file(&lower, "/pyats/replaced_job.py", JOB);
        lower
    }

    const EXPECTED_JOBS: &[&str] = &["/pyats/a/stay_job.py", "/pyats/opq/new_job.py"];

    #[test]
    fn kernel_overlay_whiteouts_and_opaque_xattrs() {
        let scratch = Scratch::new();
        let lower = lower(&scratch);
        let upper = scratch.layer("upper");
        char_whiteout(&upper, "/pyats/a/gone_job.py");
        xattr_opaque(&upper, "/pyats/opq");
        file(&upper, "/pyats/opq/new_job.py", JOB);
        char_whiteout(&upper, "/pyats/wiped");
        file(&upper, "/pyats/dir_to_file", "now a file\n");
        file(&upper, "/pyats/replaced_job.py", "def mainly():\n");
        let found = discover(vec![upper.clone(), lower.clone()]);
        assert_eq!(found.jobs, EXPECTED_JOBS);
        let view = LayerView::new(vec![upper, lower]);
        assert_eq!(
            view.lookup("/pyats/a/gone_job.py").unwrap().0,
            Node::Missing
        );
        assert_eq!(
            view.lookup("/pyats/opq/old_job.py").unwrap().0,
            Node::Missing
        );
        assert_eq!(view.lookup("/pyats/wiped").unwrap().0, Node::Missing);
        assert!(matches!(
            view.lookup("/pyats/a/stay_job.py").unwrap().0,
            Node::File { .. }
        ));
    }

    #[test]
    fn aufs_style_whiteouts_and_opaque_markers() {
        let scratch = Scratch::new();
        let lower = lower(&scratch);
        let upper = scratch.layer("upper");
        file(&upper, "/pyats/a/.wh.gone_job.py", "");
        file(&upper, "/pyats/opq/.wh..wh..opq", "");
        file(&upper, "/pyats/opq/new_job.py", JOB);
        file(&upper, "/pyats/.wh.wiped", "");
        file(&upper, "/pyats/dir_to_file", "now a file\n");
        file(&upper, "/pyats/replaced_job.py", "def mainly():\n");
        dir(&upper, "/pyats/.wh..wh.plnk");
        let found = discover(vec![upper.clone(), lower.clone()]);
        assert_eq!(found.jobs, EXPECTED_JOBS);
        let view = LayerView::new(vec![upper, lower]);
        assert_eq!(
            view.lookup("/pyats/a/gone_job.py").unwrap().0,
            Node::Missing
        );
        assert_eq!(
            view.lookup("/pyats/opq/old_job.py").unwrap().0,
            Node::Missing
        );
        assert_eq!(
            view.lookup("/pyats/wiped/inside_job.py").unwrap().0,
            Node::Missing
        );
    }

    #[test]
    fn a_recreated_path_shows_only_what_came_after_its_whiteout() {
        let scratch = Scratch::new();
        let bottom = scratch.layer("0");
        file(&bottom, "/pyats/d/first_job.py", JOB);
        let middle = scratch.layer("1");
        file(&middle, "/pyats/.wh.d", "");
        let top = scratch.layer("2");
        file(&top, "/pyats/d/again_job.py", JOB);
        assert_eq!(
            discover(vec![top, middle, bottom]).jobs,
            ["/pyats/d/again_job.py"]
        );
    }

    #[test]
    fn whiting_out_the_root_hides_lower_layers() {
        let scratch = Scratch::new();
        let bottom = scratch.layer("0");
        file(&bottom, "/pyats/old_job.py", JOB);
        let top = scratch.layer("1");
        file(&top, "/.wh.pyats", "");
        let found = discover(vec![top, bottom]);
        assert!(found.jobs.is_empty());
        assert_eq!(
            found.warnings,
            ["/pyats: workspace root not found in the image"]
        );
    }

    #[test]
    fn symlinks_resolve_in_the_image_not_on_the_host() {
        let scratch = Scratch::new();
        let lower = scratch.layer("lower");
        file(&lower, "/etc/passwd", "image passwd\n");
        file(
            &lower,
            "/opt/real.tem",
            "version: 1\ntype: easypy\nname: via-image\n",
        );
        let upper = scratch.layer("upper");
        for name in ["host", "climb", "ok"] {
            file(&upper, &format!("/pyats/{name}_job.py"), JOB);
        }
        symlink(&upper, "/pyats/host_job.tem", "/etc/shadow");
        symlink(&upper, "/pyats/climb_job.tem", "../../../../etc/shadow");
        symlink(&upper, "/pyats/ok_job.tem", "../opt/real.tem");
        symlink(&upper, "/pyats/hostdir", "/etc");
        symlink(&upper, "/pyats/hosted_job.py", "/etc/passwd");
        let found = discover(vec![upper, lower]);
        assert_eq!(
            found.jobs,
            [
                "/pyats/climb_job.py",
                "/pyats/host_job.py",
                "/pyats/ok_job.py"
            ]
        );
        assert_eq!(found.manifests.len(), 1);
        assert_eq!(found.manifests[0].name, "via-image");
        assert_eq!(
            found.warnings,
            [
                "/pyats/climb_job.tem: symlink to ../../../../etc/shadow: not found in the image",
                "/pyats/host_job.tem: symlink to /etc/shadow: not found in the image",
            ]
        );
    }

    #[test]
    fn unreadable_or_foreign_storage_is_refused() {
        let data: HashMap<String, String> =
            [("UpperDir".to_string(), "/nonexistent/diff".to_string())].into();
        assert!(
            LayerView::from_driver("overlay2", &data)
                .unwrap_err()
                .contains("/nonexistent/diff")
        );
        assert!(
            LayerView::from_driver("vfs", &data)
                .unwrap_err()
                .contains("vfs")
        );
        assert!(
            LayerView::from_driver("overlay2", &HashMap::new())
                .unwrap_err()
                .contains("UpperDir")
        );
    }
}
