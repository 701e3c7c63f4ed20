//! Finding pyATS job files and manifests inside an image.
