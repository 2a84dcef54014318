//! OCI images for sandboxes.
//!
//! An [`ImageStore`] pulls images from any OCI/Docker registry (with
//! `oci-client`) or imports `docker save` and OCI-layout tarballs, and keeps
//! every layer unpacked exactly once in a content-addressed cache:
//!
//! ```text
//! {root}/layers/sha256/<hex>/   one unpacked layer (an overlayfs lower dir)
//! {root}/images/<hex>.json      one image: reference, digest, layers, config
//! {root}/tmp/                   work space; emptied on open
//! ```
//!
//! Invariant: a directory under `layers/` is complete. Layers are unpacked
//! into `tmp/` and renamed into place only when the blob's digest has been
//! verified and every entry was written, so a crash leaves at most garbage in
//! `tmp/`, which [`ImageStore::open`] removes.
//!
//! Invariant: an image record is written only after all of its layers are in
//! place, so every layer path of a returned [`Image`] exists.
//!
//! Invariant: two concurrent requests for the same reference, or for the same
//! layer digest, share one download and one unpack (single flight).
//!
//! The crate knows nothing of namespaces: it hands out directories, and the
//! isolation driver stacks them (bottom to top) as overlayfs lower dirs.

pub mod extract;
mod flight;
mod import;
mod pull;
mod reference;
mod store;

pub use import::ImportImageError;
pub use pull::{
    Platform, PullFailure, PullImageError, PullOptions, PullPolicy, PullProgress, RegistryAuth,
};
pub use reference::{InvalidReferenceError, normalize_reference};
pub use store::{
    FetchLayerError, Image, ImageConfig, ImageStore, ListImagesError, OpenStoreError,
    ReadImageError, RemoveImageError,
};
