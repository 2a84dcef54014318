//! The bounded, offset-addressed output buffer every process writes into.
//!
//! Output is one ordered sequence of bytes from stdout and stderr together;
//! each byte has an offset in that sequence, so a reader can stop and resume
//! (reattach) exactly where it left off. Memory is bounded: when the buffer is
//! full the oldest bytes are dropped, and a reader asking for them is told
//! how many it missed instead of silently getting less.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use hutch_api::Stream;

/// Small writes are merged into the previous chunk up to this size, so a
/// process printing a byte at a time does not cost a chunk per byte.
const COALESCE_LIMIT: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub stream: Stream,
    pub offset: u64,
    pub data: Bytes,
}

#[derive(Debug)]
pub struct OutputBuffer {
    chunks: VecDeque<Chunk>,
    /// Offset of the first retained byte.
    start: u64,
    /// Offset one past the last byte ever appended.
    end: u64,
    limit: usize,
    /// Bytes dropped per stream, for `/exec`'s `stdout_dropped`/`stderr_dropped`.
    dropped_stdout: u64,
    dropped_stderr: u64,
    /// An open tail chunk still accepting coalesced writes.
    tail: Option<(Stream, BytesMut)>,
}

/// What a read returns: the chunks at or after the asked offset and how many
/// bytes before them were already dropped.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Read {
    pub dropped: u64,
    pub chunks: Vec<Chunk>,
    pub next_offset: u64,
}

impl OutputBuffer {
    pub fn new(limit: usize) -> OutputBuffer {
        OutputBuffer {
            chunks: VecDeque::new(),
            start: 0,
            end: 0,
            limit: limit.max(1),
            dropped_stdout: 0,
            dropped_stderr: 0,
            tail: None,
        }
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    pub fn end(&self) -> u64 {
        self.end
    }

    pub fn dropped(&self, stream: Stream) -> u64 {
        match stream {
            Stream::Stdout => self.dropped_stdout,
            Stream::Stderr => self.dropped_stderr,
        }
    }

    /// Appends bytes, evicting the oldest when over the limit.
    pub fn append(&mut self, stream: Stream, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        match &mut self.tail {
            Some((tail_stream, buf))
                if *tail_stream == stream && buf.len() + data.len() <= COALESCE_LIMIT =>
            {
                buf.extend_from_slice(data);
            }
            _ => {
                self.seal_tail();
                let mut buf = BytesMut::with_capacity(data.len().max(512));
                buf.extend_from_slice(data);
                self.tail = Some((stream, buf));
            }
        }
        self.end += data.len() as u64;
        self.evict();
    }

    /// Moves the open tail into the chunk list, so reads see it as a chunk.
    fn seal_tail(&mut self) {
        if let Some((stream, buf)) = self.tail.take() {
            let offset = self.end - buf.len() as u64;
            self.chunks.push_back(Chunk { stream, offset, data: buf.freeze() });
        }
    }

    fn evict(&mut self) {
        while self.end - self.start > self.limit as u64 {
            let excess = self.end - self.start - self.limit as u64;
            if self.chunks.is_empty() {
                self.seal_tail();
            }
            let Some(front) = self.chunks.front_mut() else { return };
            let take = excess.min(front.data.len() as u64);
            match front.stream {
                Stream::Stdout => self.dropped_stdout += take,
                Stream::Stderr => self.dropped_stderr += take,
            }
            if take == front.data.len() as u64 {
                self.chunks.pop_front();
            } else {
                let _ = front.data.split_to(take as usize);
                front.offset += take;
            }
            self.start += take;
        }
    }

    /// Returns up to `max_bytes` (at least one chunk's worth, if any) starting
    /// at `offset`. An offset past the end yields nothing and `next_offset`
    /// clamped to the end.
    pub fn read(&mut self, offset: u64, max_bytes: usize) -> Read {
        // Reads must see the newest bytes, so the tail is sealed first; the
        // cost is only that later small writes start a fresh chunk.
        self.seal_tail();
        let dropped = self.start.saturating_sub(offset);
        let mut position = offset.max(self.start).min(self.end);
        let first = self.chunks.partition_point(|c| c.offset + c.data.len() as u64 <= position);
        let mut chunks = Vec::new();
        let mut budget = max_bytes.max(1);
        for chunk in self.chunks.iter().skip(first) {
            if budget == 0 {
                break;
            }
            let skip = (position - chunk.offset) as usize;
            let available = chunk.data.len() - skip;
            let take = available.min(budget);
            chunks.push(Chunk {
                stream: chunk.stream,
                offset: position,
                data: chunk.data.slice(skip..skip + take),
            });
            position += take as u64;
            budget -= take;
        }
        Read { dropped, chunks, next_offset: position }
    }

    /// Everything retained, concatenated per stream (for `/exec`).
    pub fn collect(&mut self) -> (Vec<u8>, Vec<u8>) {
        self.seal_tail();
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        for chunk in &self.chunks {
            match chunk.stream {
                Stream::Stdout => stdout.extend_from_slice(&chunk.data),
                Stream::Stderr => stderr.extend_from_slice(&chunk.data),
            }
        }
        (stdout, stderr)
    }

    /// Bytes currently held.
    pub fn retained(&self) -> u64 {
        self.end - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn concat(read: &Read) -> Vec<u8> {
        read.chunks.iter().flat_map(|c| c.data.iter().copied()).collect()
    }

    #[test]
    fn reads_resume_at_any_offset_across_streams() {
        let mut buf = OutputBuffer::new(1024);
        buf.append(Stream::Stdout, b"hello ");
        buf.append(Stream::Stderr, b"oops ");
        buf.append(Stream::Stdout, b"world");
        let all = buf.read(0, usize::MAX);
        assert_eq!(concat(&all), b"hello oops world");
        assert_eq!(
            all.chunks.iter().map(|c| c.stream).collect::<Vec<_>>(),
            [Stream::Stdout, Stream::Stderr, Stream::Stdout]
        );
        let tail = buf.read(8, usize::MAX);
        assert_eq!(concat(&tail), b"ps world");
        assert_eq!(tail.chunks[0].offset, 8);
        assert_eq!(tail.next_offset, 16);
        assert_eq!(buf.read(99, 10).next_offset, 16);
    }

    #[test]
    fn eviction_reports_dropped_bytes_per_stream() {
        let mut buf = OutputBuffer::new(10);
        buf.append(Stream::Stdout, b"0123456789");
        buf.append(Stream::Stderr, b"abcde");
        assert_eq!(buf.start(), 5);
        assert_eq!(buf.dropped(Stream::Stdout), 5);
        let read = buf.read(0, usize::MAX);
        assert_eq!(read.dropped, 5);
        assert_eq!(concat(&read), b"56789abcde");
        assert_eq!(read.chunks[0].offset, 5);
        assert_eq!(buf.collect(), (b"56789".to_vec(), b"abcde".to_vec()));
    }

    #[test]
    fn max_bytes_limits_a_read_and_the_rest_follows() {
        let mut buf = OutputBuffer::new(1 << 20);
        for i in 0..100u8 {
            buf.append(if i % 2 == 0 { Stream::Stdout } else { Stream::Stderr }, &[i; 100]);
        }
        let mut offset = 0;
        let mut seen = Vec::new();
        loop {
            let read = buf.read(offset, 333);
            if read.chunks.is_empty() {
                break;
            }
            assert!(read.chunks.iter().map(|c| c.data.len()).sum::<usize>() <= 333);
            seen.extend(concat(&read));
            offset = read.next_offset;
        }
        assert_eq!(seen.len(), 10_000);
        assert_eq!(offset, 10_000);
    }

    #[test]
    fn binary_bytes_survive() {
        let mut buf = OutputBuffer::new(64);
        let data = [0u8, 0xff, 0xfe, b'\n', 0x80];
        buf.append(Stream::Stdout, &data);
        assert_eq!(concat(&buf.read(0, 64)), data);
    }
}
