//! The browser's side of a relay, as tungstenite reads it: small reads for small messages,
//! large ones for a large message.
//!
//! tungstenite zero-fills its read buffer before every read, and every read it makes is at
//! most that buffer's size. A large buffer costs a memset per read (about a microsecond of
//! a 64-byte round trip for 8 KiB, docs/bench/relay.txt) and stays with the connection
//! however idle; a small one costs a syscall per few KiB of a large message (a paste, a file).
//! So tungstenite gets a small buffer ([`TUNGSTENITE_READ`]), and this layer reads ahead only
//! when a read filled at least half of it: a large message then arrives 64 KiB a syscall, into
//! a buffer that is given back once drained, and input events are read straight into
//! tungstenite's buffer. (tungstenite itself keeps a buffer the size of the largest message
//! it has received, for the connection's life.)
use bytes::{Buf, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most read from the socket at once when reading ahead.
const AHEAD: usize = 64 * 1024;

/// tungstenite's read buffer (its `read_buffer_size`), which this layer is sized against.
pub const TUNGSTENITE_READ: usize = 1024;

/// A read that filled this much of the caller's room or more (all of it) suggests a large
/// message: tungstenite's room shrinks to a few bytes as frames are split off its buffer, and
/// two input events filling such a room are not one.
const BULK_ROOM: usize = TUNGSTENITE_READ / 2;

/// A stream whose reads go ahead of the reader once it reads in bulk; writes pass through.
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    /// Read from the stream and not yet taken; no allocation unless reading ahead.
    ahead: BytesMut,
    /// The last read filled all the room it had: more is likely waiting.
    bulk: bool,
}

impl<S> ReadAhead<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        ReadAhead {
            inner,
            ahead: BytesMut::new(),
            bulk: false,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ahead.is_empty() && this.bulk && out.remaining() < AHEAD {
            this.ahead.reserve(AHEAD);
            let read =
                tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.ahead);
            // Filled all its room: more is likely waiting still.
            this.bulk = this.ahead.len() == this.ahead.capacity();
            if this.ahead.is_empty() {
                // Nothing yet (or the end, or an error): no buffer held while waiting.
                this.ahead = BytesMut::new();
            }
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // The end, which the read below reports again.
                Poll::Ready(Ok(_)) => {}
            }
        }
        if !this.ahead.is_empty() {
            let n = out.remaining().min(this.ahead.len());
            out.put_slice(&this.ahead[..n]);
            this.ahead.advance(n);
            if this.ahead.is_empty() {
                // Given back: a connection that went quiet holds no read-ahead buffer.
                this.ahead = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        // Nothing ahead (or the stream ended while reading ahead: then this reads the end).
        let room = out.remaining();
        ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
        this.bulk = room >= BULK_ROOM && out.remaining() == 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads `r` to its end `size` bytes at a time: what came, and in how many reads.
    async fn read_to_end(r: &mut (impl AsyncRead + Unpin), size: usize) -> (Vec<u8>, usize) {
        let (mut got, mut reads, mut buf) = (Vec::new(), 0, vec![0u8; size]);
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return (got, reads);
            }
            got.extend_from_slice(&buf[..n]);
            reads += 1;
        }
    }

    /// Whatever the sizes written and read, the bytes come out as they went in, the end is
    /// seen, and nothing is held once all was read.
    #[tokio::test]
    async fn bytes_come_through_in_order_whatever_the_read_sizes() {
        let (mut w, r) = tokio::io::duplex(256 * 1024);
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                // Small writes, then large ones: the reader goes from direct to ahead.
                for chunk in sent[..1000].chunks(10) {
                    w.write_all(chunk).await.unwrap();
                }
                for chunk in sent[1000..].chunks(70_000) {
                    w.write_all(chunk).await.unwrap();
                }
            })
        };
        let mut r = ReadAhead::new(r);
        let (got, _) = read_to_end(&mut r, 1024).await;
        writer.await.unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes reordered or changed");
        assert_eq!(r.ahead.capacity(), 0, "a drained reader holds its buffer");
    }

    /// A reader asking for a small buffer gets large reads from the stream once it reads in
    /// bulk: the stream sees far fewer reads than the reader makes.
    #[tokio::test]
    async fn a_bulk_reader_reads_the_stream_64_kib_at_a_time() {
        let mut r = ReadAhead::new(Scripted::new([Step::Data(vec![7u8; 1024 * 1024])]));
        let (_, reads) = read_to_end(&mut r, 1024).await;
        assert_eq!(reads, 1024);
        // One direct read, then 16 of 64 KiB, then the end.
        assert!(r.inner.reads <= 20, "{} reads of the stream", r.inner.reads);

        // Rooms of a few bytes (tungstenite's, between frames) do not start reading ahead.
        let mut r = ReadAhead::new(Scripted::new([Step::Data(vec![7u8; 4096])]));
        let (_, reads) = read_to_end(&mut r, 16).await;
        assert_eq!(reads, 256);
        assert_eq!(r.inner.reads, 257, "small reads went ahead");
    }

    /// A stream that plays a script: data, a Pending (waking at once), an error, the end;
    /// counting the reads asked of it.
    enum Step {
        Data(Vec<u8>),
        Pending,
        Fail,
    }

    struct Scripted {
        steps: std::collections::VecDeque<Step>,
        reads: usize,
    }

    impl Scripted {
        fn new(steps: impl IntoIterator<Item = Step>) -> Self {
            Scripted {
                steps: steps.into_iter().collect(),
                reads: 0,
            }
        }
    }

    impl AsyncRead for Scripted {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            this.reads += 1;
            let steps = &mut this.steps;
            match steps.pop_front() {
                None => Poll::Ready(Ok(())),
                Some(Step::Pending) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                Some(Step::Fail) => Poll::Ready(Err(io::Error::other("reset"))),
                Some(Step::Data(mut d)) => {
                    let n = out.remaining().min(d.len());
                    out.put_slice(&d[..n]);
                    if n < d.len() {
                        steps.push_front(Step::Data(d.split_off(n)));
                    }
                    Poll::Ready(Ok(()))
                }
            }
        }
    }

    /// Waiting, failing and ending while reading ahead: no buffer is held while the stream
    /// has nothing, an error reaches the reader, and bytes read ahead before the end are all
    /// delivered before it.
    #[tokio::test]
    async fn pending_errors_and_the_end_while_reading_ahead() {
        use futures_util::task::noop_waker_ref;
        let bytes = |n: usize, from: u8| (0..n).map(|i| from.wrapping_add(i as u8)).collect();
        let mut r = ReadAhead::new(Scripted::new([
            Step::Data(bytes(1024, 0)),
            Step::Pending,
            Step::Data(bytes(3000, 1)),
            Step::Fail,
            Step::Data(bytes(10, 2)),
        ]));
        let mut buf = [0u8; 1024];
        assert_eq!(r.read(&mut buf).await.unwrap(), 1024);
        assert!(r.bulk, "a read that filled its room reads ahead next");
        // The read ahead finds nothing yet: Pending, and its 64 KiB are given back.
        let mut rb = ReadBuf::new(&mut buf);
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(Pin::new(&mut r).poll_read(&mut cx, &mut rb).is_pending());
        assert_eq!(r.ahead.capacity(), 0, "a buffer held while waiting");
        let mut got = Vec::new();
        loop {
            match r.read(&mut buf).await {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => {
                    assert_eq!(e.to_string(), "reset");
                    break;
                }
            }
        }
        assert!(
            got == bytes(3000, 1),
            "bytes lost or changed before the error"
        );
        assert_eq!(r.read(&mut buf).await.unwrap(), 10);
        assert_eq!(r.read(&mut buf).await.unwrap(), 0);

        // The end right after a read ahead: what was read ahead comes first, then the end.
        let mut r = ReadAhead::new(Scripted::new([
            Step::Data(bytes(1024, 3)),
            Step::Data(bytes(2000, 4)),
        ]));
        let (got, _) = read_to_end(&mut r, 1024).await;
        let mut want: Vec<u8> = bytes(1024, 3);
        want.extend(bytes(2000, 4).iter());
        assert!(got == want, "bytes lost or changed before the end");
        assert_eq!(r.ahead.capacity(), 0);
    }
}
