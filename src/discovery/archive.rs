//! The `archive` source: the engine's tar archive of the workspace root, from a container that
//! is created for it (never started) and always removed. The archive is parsed as it streams in:
//! nothing is written to disk and only the file being judged is in memory. Symlinks (and tar
//! hard links) are resolved inside the image with `resolve` and fetched by their own request.

use std::collections::HashMap;
use std::io::{self, BufReader, Read};

use bollard::Docker;
use bollard::errors::Error as EngineError;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CreateContainerOptions, DownloadFromContainerOptions, RemoveContainerOptions,
};
use futures_util::{StreamExt, TryStreamExt, stream};
use tar::{Archive, EntryType};
use tokio_util::io::{StreamReader, SyncIoBridge};

use super::DiscoveryError;
use super::findings::{Findings, Interest};
use super::resolve::{Node, Resolution, ResolveError};
use super::rules::{is_runtime_path, jobfiles_txt, join, strip_root};

type TarReader = Box<dyn Read + Send>;

const ARCHIVE_BUFFER: usize = 256 * 1024;

pub(crate) async fn scan(
    docker: &Docker,
    image: &str,
    findings: Findings,
) -> Result<Findings, DiscoveryError> {
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        cmd: Some(vec!["/nonexistent".into()]),
        network_disabled: Some(true),
        ..Default::default()
    };
    let created = docker
        .create_container(None::<CreateContainerOptions>, body)
        .await?;
    let container = Container {
        docker: docker.clone(),
        id: created.id,
        removed: false,
    };
    let result = scan_container(&container, findings).await;
    container.remove().await;
    result
}

/// A container made only to read its files; removed on every path, also when the discovery
/// future is dropped midway.
struct Container {
    docker: Docker,
    id: String,
    removed: bool,
}

impl Container {
    fn remove_options() -> Option<RemoveContainerOptions> {
        // `v`: an image VOLUME gets an anonymous volume at create time; it goes too.
        Some(RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        })
    }

    async fn remove(mut self) {
        self.removed = true;
        if let Err(error) = self
            .docker
            .remove_container(&self.id, Self::remove_options())
            .await
        {
            tracing::warn!(message = "Failed to remove the discovery container.", container = %self.id, %error);
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        let (docker, id) = (self.docker.clone(), self.id.clone());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = docker
                    .remove_container(&id, Container::remove_options())
                    .await;
            });
        }
    }
}

async fn scan_container(
    container: &Container,
    mut findings: Findings,
) -> Result<Findings, DiscoveryError> {
    let root = findings.rules.root().to_owned();
    let mut tree = RemoteTree {
        container,
        index: HashMap::new(),
    };
    let Some(walk_root) = tree.resolve_dir(&root).await? else {
        findings.warn(&root, "workspace root not found in the image");
        return Ok(findings);
    };
    if let Ok((path, _)) = tree.resolve(&jobfiles_txt(&root)).await? {
        let cap = findings.max_manifest_bytes();
        let text = tree.fetch(&path, move |entry| {
            let mut bytes = Vec::new();
            entry.take(cap).read_to_end(&mut bytes)?;
            Ok(bytes)
        });
        if let Some(bytes) = text.await? {
            findings.jobfiles_txt(bytes.as_slice());
        }
    }

    let walk = {
        let (root, walk_root) = (root.clone(), walk_root.clone());
        move |archive: &mut Archive<TarReader>| stream_root(archive, &root, &walk_root, findings)
    };
    let Some((mut findings, index, deferred)) = archive(container, &walk_root, walk).await? else {
        return Err(DiscoveryError::Io(io::Error::other(format!(
            "{walk_root} vanished from the container"
        ))));
    };
    tree.index = index;

    for item in deferred {
        let resolved = match &item.kind {
            Deferred::Symlink { .. } => tree.resolve(&item.real).await?,
            Deferred::Hardlink { target } => tree.resolve(target).await?,
        };
        let (path, size) = match resolved {
            Ok(found) => found,
            Err(e) => {
                match &item.kind {
                    Deferred::Symlink { target } => {
                        findings.warn(&item.reported, format_args!("symlink to {target}: {e}"))
                    }
                    Deferred::Hardlink { target } => {
                        findings.warn(&item.reported, format_args!("hard link to {target}: {e}"))
                    }
                }
                continue;
            }
        };
        let reported = item.reported.clone();
        let judged = tree.fetch(&path, move |entry| {
            let mut findings = findings;
            match Findings::interest(&reported) {
                Interest::Job => findings.job_file(&reported, &mut BufReader::new(entry)),
                Interest::Manifest => findings.manifest(&reported, size, entry),
                Interest::None => {}
            }
            Ok(findings)
        });
        findings = judged
            .await?
            .ok_or_else(|| io::Error::other(format!("{path} vanished from the container")))?;
    }
    Ok(findings)
}

struct DeferredFile {
    reported: String,
    real: String,
    kind: Deferred,
}

enum Deferred {
    Symlink { target: String },
    Hardlink { target: String },
}

/// Reads the archive of `walk_root`, judging regular files as they pass and keeping an index of
/// its entries (all but the regular files of skipped trees) for symlink resolution.
fn stream_root(
    archive: &mut Archive<TarReader>,
    root: &str,
    walk_root: &str,
    mut findings: Findings,
) -> io::Result<(Findings, HashMap<String, Node>, Vec<DeferredFile>)> {
    let parent = walk_root.rsplit_once('/').map_or("", |(p, _)| p);
    let real_of = |name: &[u8]| {
        join(
            parent,
            String::from_utf8_lossy(name)
                .trim_start_matches("./")
                .trim_end_matches('/'),
        )
    };
    let mut index = HashMap::new();
    let mut deferred = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let real = real_of(&entry.path_bytes());
        let Some(rel) = strip_root(&real, walk_root) else {
            continue;
        };
        let reported = join(root, rel);
        let kind = entry.header().entry_type();
        let node = match kind {
            EntryType::Directory => Node::Dir,
            EntryType::Regular | EntryType::Continuous | EntryType::Link => {
                Node::File { size: entry.size() }
            }
            EntryType::Symlink => Node::Symlink {
                target: entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default(),
            },
            _ => Node::Other,
        };
        let skipped = findings.rules.in_skipped_dir(&reported) || is_runtime_path(&reported);
        // Regular files of skipped trees (a virtualenv: most of an image's entries) stay out
        // of the index, so its size follows what is searched, not the image; a link that
        // points at one is looked up with its own request (`RemoteTree::lookup`).
        if !(skipped && matches!(node, Node::File { .. })) {
            index.insert(real.clone(), node.clone());
        }
        if node == Node::Dir || skipped {
            continue;
        }
        findings.count_file(&reported);
        let interest = Findings::interest(&reported);
        if interest == Interest::None {
            continue;
        }
        match (kind, node) {
            (EntryType::Link, _) => {
                let target = real_of(&entry.link_name_bytes().unwrap_or_default());
                deferred.push(DeferredFile {
                    reported,
                    real,
                    kind: Deferred::Hardlink { target },
                });
            }
            (_, Node::Symlink { target }) => deferred.push(DeferredFile {
                reported,
                real,
                kind: Deferred::Symlink { target },
            }),
            (_, Node::File { size }) => match interest {
                Interest::Job => findings.job_file(&reported, &mut BufReader::new(&mut entry)),
                Interest::Manifest => findings.manifest(&reported, size, &mut entry),
                Interest::None => {}
            },
            _ => findings.warn(&reported, "not a regular file"),
        }
    }
    Ok((findings, index, deferred))
}

/// The image's tree as the container shows it: the streamed index under the root once it is
/// read, single-path archive requests elsewhere.
struct RemoteTree<'a> {
    container: &'a Container,
    index: HashMap<String, Node>,
}

impl RemoteTree<'_> {
    async fn lookup(&mut self, path: &str) -> Result<Node, DiscoveryError> {
        if let Some(node) = self.index.get(path) {
            return Ok(node.clone());
        }
        // Under the walked root the index lacks only regular files of skipped trees (and paths
        // that do not exist): either way the engine answers for that one path.
        let node = archive(self.container, path, |archive: &mut Archive<TarReader>| {
            let mut entries = archive.entries()?;
            let Some(entry) = entries.next().transpose()? else {
                return Ok(Node::Missing);
            };
            Ok(match entry.header().entry_type() {
                EntryType::Directory => Node::Dir,
                EntryType::Regular | EntryType::Continuous => Node::File { size: entry.size() },
                EntryType::Symlink => Node::Symlink {
                    target: entry
                        .link_name_bytes()
                        .map(|t| String::from_utf8_lossy(&t).into_owned())
                        .unwrap_or_default(),
                },
                _ => Node::Other,
            })
        })
        .await?
        .unwrap_or(Node::Missing);
        self.index.insert(path.to_owned(), node.clone());
        Ok(node)
    }

    async fn resolve(
        &mut self,
        path: &str,
    ) -> Result<Result<(String, u64), ResolveError>, DiscoveryError> {
        let mut r = Resolution::new(path);
        loop {
            match r.next() {
                Ok(Some(p)) => {
                    let node = self.lookup(&p).await?;
                    if let Err(e) = r.feed(node) {
                        return Ok(Err(e));
                    }
                }
                Ok(None) => return Ok(r.into_file()),
                Err(e) => return Ok(Err(e)),
            }
        }
    }

    async fn resolve_dir(&mut self, path: &str) -> Result<Option<String>, DiscoveryError> {
        let mut r = Resolution::new(path);
        loop {
            match r.next() {
                Ok(Some(p)) => {
                    let node = self.lookup(&p).await?;
                    if r.feed(node).is_err() {
                        return Ok(None);
                    }
                }
                Ok(None) => return Ok(r.into_dir()),
                Err(_) => return Ok(None),
            }
        }
    }

    /// Runs `f` on the content of the regular file at `path` (already resolved).
    async fn fetch<T: Send + 'static>(
        &self,
        path: &str,
        f: impl FnOnce(&mut tar::Entry<'_, TarReader>) -> io::Result<T> + Send + 'static,
    ) -> Result<Option<T>, DiscoveryError> {
        let found = archive(
            self.container,
            path,
            move |archive: &mut Archive<TarReader>| {
                let mut entries = archive.entries()?;
                match entries.next().transpose()? {
                    Some(mut entry) if entry.header().entry_type().is_file() => {
                        f(&mut entry).map(Some)
                    }
                    _ => Ok(None),
                }
            },
        );
        Ok(found.await?.flatten())
    }
}

/// Streams the engine's archive of `path` through `f` on a blocking thread; `None` when the
/// container has no such path.
async fn archive<T: Send + 'static>(
    container: &Container,
    path: &str,
    f: impl FnOnce(&mut Archive<TarReader>) -> io::Result<T> + Send + 'static,
) -> Result<Option<T>, DiscoveryError> {
    let options = DownloadFromContainerOptions {
        path: path.to_owned(),
    };
    let mut body = container
        .docker
        .download_from_container(&container.id, Some(options));
    let first = match body.next().await {
        Some(Err(EngineError::DockerResponseServerError {
            status_code: 404, ..
        })) => return Ok(None),
        Some(Err(e)) => return Err(e.into()),
        Some(Ok(bytes)) => Some(Ok(bytes)),
        None => None,
    };
    let body = stream::iter(first).chain(body).map_err(io::Error::other);
    // Few large reads: each read of the bridge is a round trip to the runtime.
    let reader: TarReader = Box::new(BufReader::with_capacity(
        ARCHIVE_BUFFER,
        SyncIoBridge::new(StreamReader::new(body)),
    ));
    let task = tokio::task::spawn_blocking(move || f(&mut Archive::new(reader)));
    Ok(Some(task.await.map_err(io::Error::other)??))
}
