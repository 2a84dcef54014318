//! The nf_tables netlink seam for set elements: the only nftables change on a
//! sandbox's attach and detach path, sent as one nf_tables batch (one
//! transaction) over a netlink socket, without an `nft` process.
//!
//! An `nft` run costs about 4 ms of process start-up, cache loading and JSON
//! parsing, and competes for the CPU with the rest of sandbox creation; adding
//! or deleting two set elements over netlink costs tens of microseconds. The
//! static ruleset, listings and sweeps still go through `nft` (see `nft.rs`).
//!
//! Messages are built by hand (the layouts are `linux/netfilter/nfnetlink.h`
//! and `linux/netfilter/nf_tables.h`): there is no Apache-compatible crate
//! for nf_tables netlink, and only three message types are needed.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
/// `NFTNL_UDATA_SET_ELEM_COMMENT`: how `nft` stores an element's comment.
const UDATA_SET_ELEM_COMMENT: u8 = 0;
const NLA_F_NESTED: u16 = 1 << 15;
const NLMSG_HDRLEN: usize = 16;
/// Elements per batch: a netlink message must fit the socket's send buffer
/// (about 200 KiB by default), and an element takes about 130 bytes.
const MAX_BATCH: usize = 256;
/// How long a reply may take; the kernel answers while handling the send, so
/// this only bounds a wait that should never happen.
const REPLY_TIMEOUT: libc::timeval = libc::timeval { tv_sec: 1, tv_usec: 0 };

/// The nftables families the sets live in (`NFPROTO_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Inet = 1,
    Bridge = 7,
}

/// One set element: which set, its key as the kernel stores it, and the
/// comment `nft list` shows for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SetElement {
    pub family: Family,
    pub table: String,
    pub set: String,
    pub key: Vec<u8>,
    pub comment: String,
}

/// Why a set element request failed.
#[derive(Debug, thiserror::Error)]
pub enum SetElementError {
    #[error("cannot open an nf_tables netlink socket")]
    Socket(#[source] io::Error),
    #[error("cannot send an nf_tables batch")]
    Send(#[source] io::Error),
    #[error("cannot read the nf_tables reply")]
    Receive(#[source] io::Error),
    #[error("nf_tables rejected the set elements of {comment:?} in set {set:?}")]
    Rejected {
        set: String,
        comment: String,
        #[source]
        source: io::Error,
    },
    #[error("nf_tables rejected a batch")]
    BatchRejected(#[source] io::Error),
}

impl SetElementError {
    /// Whether the kernel said an element (or its set) does not exist.
    pub(crate) fn is_not_found(&self) -> bool {
        match self {
            SetElementError::Rejected { source, .. } | SetElementError::BatchRejected(source) => {
                source.raw_os_error() == Some(libc::ENOENT)
            }
            _ => false,
        }
    }
}

/// Sends set element batches over one netlink socket, opened in the
/// manager's network namespace and kept for the manager's life.
///
/// Kept, not opened per batch: closing an nf_tables socket makes the kernel
/// (`nft_rcv_nl_event`) wait for the deferred release of earlier
/// transactions, an RCU grace period, while it holds the namespace's commit
/// mutex, and the next batch (the next sandbox's attach) waits behind it —
/// about 10 ms each while dying sandbox namespaces keep RCU busy.
#[derive(Debug)]
pub(crate) struct SetElements {
    // A std mutex: held only for one send and the receives that answer it,
    // which the kernel queued before the send returned; never across an await.
    socket: Mutex<Socket>,
}

#[derive(Debug)]
struct Socket {
    fd: OwnedFd,
    sequence: u32,
}

impl SetElements {
    /// Opens the socket in the calling thread's network namespace.
    pub(crate) fn open() -> Result<Self, SetElementError> {
        Ok(SetElements { socket: Mutex::new(Socket { fd: open_socket()?, sequence: 1 }) })
    }

    /// Adds the elements, in one transaction per [`MAX_BATCH`] elements; an
    /// element that exists already is kept (not an error).
    pub(crate) fn add(&self, elements: &[SetElement]) -> Result<(), SetElementError> {
        for chunk in elements.chunks(MAX_BATCH) {
            self.send(NFT_MSG_NEWSETELEM, libc::NLM_F_CREATE as u16, chunk)?;
        }
        Ok(())
    }

    /// Deletes the elements (at most [`MAX_BATCH`]) in one transaction. If one
    /// of them is missing, nothing is deleted and the error says so (see
    /// [`SetElementError::is_not_found`]).
    pub(crate) fn delete(&self, elements: &[SetElement]) -> Result<(), SetElementError> {
        self.send(NFT_MSG_DELSETELEM, 0, elements)
    }

    /// Deletes each element in a transaction of its own; missing ones are fine.
    pub(crate) fn delete_each(&self, elements: &[SetElement]) -> Result<(), SetElementError> {
        for element in elements {
            match self.delete(std::slice::from_ref(element)) {
                Err(error) if !error.is_not_found() => return Err(error),
                _ => {}
            }
        }
        Ok(())
    }

    fn send(
        &self,
        message_type: u16,
        flags: u16,
        elements: &[SetElement],
    ) -> Result<(), SetElementError> {
        if elements.is_empty() {
            return Ok(());
        }
        // Every update of the socket state is complete before anything can
        // panic, so a poisoned lock holds a usable socket.
        let mut socket = self.socket.lock().unwrap_or_else(|poison| poison.into_inner());
        let count = u32::try_from(elements.len()).unwrap_or(u32::MAX - 2);
        let first = socket.sequence;
        socket.sequence = first.wrapping_add(count + 2);
        let batch = batch(first, message_type, flags, elements);
        let fd = socket.fd.as_raw_fd();
        // The kernel handles the whole batch inside `send` and queues every
        // reply before it returns, so the receives below do not wait; a call
        // from async code costs what a short syscall costs.
        // SAFETY: `fd` is an open netlink socket and `batch` a valid buffer of
        // the given length.
        let sent = unsafe { libc::send(fd, batch.as_ptr().cast(), batch.len(), 0) };
        if sent < 0 {
            return Err(SetElementError::Send(io::Error::last_os_error()));
        }
        // One acknowledgement per element message (NLM_F_ACK), or a single
        // error for the batch when its commit fails. Replies to earlier
        // batches that were cut short are told apart by their sequence.
        let mut acknowledged = 0;
        let mut buffer = vec![0u8; 16 * 1024];
        let result = loop {
            if acknowledged == elements.len() {
                break Ok(());
            }
            let received = match receive(fd, &mut buffer, 0) {
                Ok(received) => received,
                Err(error) => break Err(SetElementError::Receive(error)),
            };
            let failure =
                acknowledgements(&buffer[..received]).into_iter().find_map(|(sequence, errno)| {
                    let offset = sequence.wrapping_sub(first);
                    if offset > count + 1 {
                        return None;
                    }
                    if errno == 0 {
                        acknowledged += 1;
                        return None;
                    }
                    let source = io::Error::from_raw_os_error(errno);
                    Some(match elements.get(offset.wrapping_sub(1) as usize) {
                        Some(element) => SetElementError::Rejected {
                            set: element.set.clone(),
                            comment: element.comment.clone(),
                            source,
                        },
                        None => SetElementError::BatchRejected(source),
                    })
                });
            if let Some(failure) = failure {
                break Err(failure);
            }
        };
        if result.is_err() {
            // Whatever else the kernel queued for this batch, so that the next
            // batch starts from an empty queue.
            while receive(fd, &mut buffer, libc::MSG_DONTWAIT).is_ok_and(|n| n > 0) {}
        }
        result
    }
}

fn receive(fd: libc::c_int, buffer: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buffer` is valid for writes of its length.
    let received = unsafe { libc::recv(fd, buffer.as_mut_ptr().cast(), buffer.len(), flags) };
    usize::try_from(received).map_err(|_| io::Error::last_os_error())
}

fn open_socket() -> Result<OwnedFd, SetElementError> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, NETLINK_NETFILTER)
    };
    if fd < 0 {
        return Err(SetElementError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = REPLY_TIMEOUT;
    // SAFETY: setsockopt with a pointer to a timeval of the size passed.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if result < 0 {
        return Err(SetElementError::Socket(io::Error::last_os_error()));
    }
    Ok(socket)
}

/// A batch: begin, one message per element (sequence numbers `first + 1 ..`),
/// end.
fn batch(first: u32, message_type: u16, flags: u16, elements: &[SetElement]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + elements.len() * 160);
    let subsystem = NFNL_SUBSYS_NFTABLES.to_be();
    message(&mut out, NFNL_MSG_BATCH_BEGIN, 0, first, 0, subsystem, |_| {});
    for (offset, element) in (1u32..).zip(elements) {
        message(
            &mut out,
            (NFNL_SUBSYS_NFTABLES << 8) | message_type,
            flags | libc::NLM_F_ACK as u16,
            first.wrapping_add(offset),
            element.family as u8,
            0,
            |out| element_attributes(out, element),
        );
    }
    let end = first.wrapping_add(elements.len() as u32 + 1);
    message(&mut out, NFNL_MSG_BATCH_END, 0, end, 0, subsystem, |_| {});
    out
}

/// Appends one netlink message with an `nfgenmsg` header and the attributes
/// `body` writes.
fn message(
    out: &mut Vec<u8>,
    message_type: u16,
    flags: u16,
    sequence: u32,
    family: u8,
    resource_id: u16,
    body: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.extend_from_slice(&0u32.to_ne_bytes()); // length, patched below
    out.extend_from_slice(&message_type.to_ne_bytes());
    out.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
    out.extend_from_slice(&sequence.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    out.push(family);
    out.push(0); // NFNETLINK_V0
    out.extend_from_slice(&resource_id.to_ne_bytes());
    body(out);
    let length = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&length.to_ne_bytes());
}

fn element_attributes(out: &mut Vec<u8>, element: &SetElement) {
    attribute(out, NFTA_SET_ELEM_LIST_TABLE, &nul_terminated(&element.table));
    attribute(out, NFTA_SET_ELEM_LIST_SET, &nul_terminated(&element.set));
    nested(out, NFTA_SET_ELEM_LIST_ELEMENTS, |out| {
        nested(out, NFTA_LIST_ELEM, |out| {
            nested(out, NFTA_SET_ELEM_KEY, |out| attribute(out, NFTA_DATA_VALUE, &element.key));
            let comment = nul_terminated(&element.comment);
            let mut userdata = vec![UDATA_SET_ELEM_COMMENT, comment.len() as u8];
            userdata.extend_from_slice(&comment);
            attribute(out, NFTA_SET_ELEM_USERDATA, &userdata);
        });
    });
}

fn nul_terminated(text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    bytes.push(0);
    bytes
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

fn attribute(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    pad(out);
}

fn nested(out: &mut Vec<u8>, kind: u16, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&0u16.to_ne_bytes());
    out.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    body(out);
    let length = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&length.to_ne_bytes());
}

/// The `(sequence, errno)` of every `NLMSG_ERROR` message in `buffer` (an
/// errno of 0 is an acknowledgement).
fn acknowledgements(buffer: &[u8]) -> Vec<(u32, i32)> {
    let mut found = Vec::new();
    let mut rest = buffer;
    while rest.len() >= NLMSG_HDRLEN {
        let length = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if length < NLMSG_HDRLEN || length > rest.len() {
            break;
        }
        let message_type = u16::from_ne_bytes([rest[4], rest[5]]);
        let sequence = u32::from_ne_bytes([rest[8], rest[9], rest[10], rest[11]]);
        if message_type == libc::NLMSG_ERROR as u16 && length >= NLMSG_HDRLEN + 4 {
            let error = i32::from_ne_bytes([rest[16], rest[17], rest[18], rest[19]]);
            found.push((sequence, -error));
        }
        rest = &rest[(length + 3) & !3..];
        if rest.len() < NLMSG_HDRLEN {
            break;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn element() -> SetElement {
        SetElement {
            family: Family::Inet,
            table: "hutch".to_owned(),
            set: "sandbox_addrs".to_owned(),
            key: vec![10, 89, 0, 2],
            comment: "hutch:sb-1".to_owned(),
        }
    }

    #[test]
    fn a_batch_frames_each_element_between_begin_and_end() {
        let bytes = batch(100, NFT_MSG_NEWSETELEM, libc::NLM_F_CREATE as u16, &[element()]);
        let mut messages = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let length = u32::from_ne_bytes(rest[..4].try_into().unwrap()) as usize;
            assert_eq!(length % 4, 0, "messages stay 4-byte aligned");
            let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
            let sequence = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
            messages.push((kind, sequence, rest[16]));
            rest = &rest[length..];
        }
        assert_eq!(
            messages,
            [
                (NFNL_MSG_BATCH_BEGIN, 100, 0),
                ((10 << 8) | 12, 101, 1),
                (NFNL_MSG_BATCH_END, 102, 0)
            ]
        );
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("hutch\0") && text.contains("sandbox_addrs\0"));
        assert!(text.contains("hutch:sb-1\0"));
    }

    #[test]
    fn acknowledgements_carry_sequence_and_errno() {
        let mut reply = Vec::new();
        for (sequence, error) in [(7u32, 0i32), (8, -libc::ENOENT)] {
            reply.extend_from_slice(&36u32.to_ne_bytes());
            reply.extend_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
            reply.extend_from_slice(&0u16.to_ne_bytes());
            reply.extend_from_slice(&sequence.to_ne_bytes());
            reply.extend_from_slice(&0u32.to_ne_bytes());
            reply.extend_from_slice(&error.to_ne_bytes());
            reply.extend_from_slice(&[0; 16]);
        }
        assert_eq!(acknowledgements(&reply), [(7, 0), (8, libc::ENOENT)]);
    }
}
