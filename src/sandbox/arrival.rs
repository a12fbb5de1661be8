//! When a call arrived, as the kernel saw its bytes rather than as the
//! sandbox's runtime got round to it.
//!
//! Stamping a call in its handler measures the sandbox's own scheduling: a
//! runtime stalled for 76 ms on a loaded host finds a clump of calls that
//! had been waiting in the kernel and stamps them all at once, as if the
//! senders had sent them in a burst. So on Linux each accepted socket has
//! `SO_TIMESTAMPNS` set and is read with `recvmsg`, through [`Stamped`]:
//! TCP reports, with each read, the receive time of the last segment it
//! consumed (an `SCM_TIMESTAMPNS` control message). That time, converted
//! to the monotonic clock `Instant` reads, is kept in the connection's
//! [`Cell`], and [`Stamp`] (the hyper service of the connection) takes it
//! into the request's extensions as [`Arrived`] when hyper dispatches the
//! request, that is as soon as it has parsed the head and before it reads
//! from the socket again.
//!
//! Which requests it is exact for:
//! - HTTP/1.x: a client (reqwest, bulkcall) sends a request only after it
//!   has read the previous answer, so the last read before the head was
//!   parsed carried the end of this request's head: its stamp is when the
//!   head had arrived (a body sent in the same segments or read in the same
//!   `recvmsg` may make it the body's, microseconds later). Over TLS the
//!   wrapper sits under rustls, so the same holds for the records it reads.
//! - HTTP/2 (over TLS, or h2c): streams are multiplexed and the connection
//!   reads ahead of dispatching, so the last read may have carried another
//!   stream's frames, later than this request's. It is not attributed: no
//!   [`Arrived`] is set and the handler's clock is used, as before.
//! - A read with no timestamp (timestamping could not be enabled, or the
//!   segments arrived before the kernel turned receive timestamps on, which
//!   it does a moment after the first socket asks): the cell is emptied and
//!   the request falls back to the handler's clock too.
//!
//! Clocks: the kernel stamps with `CLOCK_REALTIME`; `Instant` is
//! `CLOCK_MONOTONIC`. At each read the age of the stamp is taken on the
//! realtime clock (the midpoint of two readings either side of one
//! `Instant::now()`) and subtracted from that `Instant`. Both clocks run at
//! the same (NTP-slewed) rate, so the age is exact up to half the readings'
//! spread (well under a microsecond through the vDSO), unless the realtime
//! clock is stepped (settimeofday, an NTP step) between the segment's
//! arrival and its read: then the stamp is off by the step. A stamp that
//! comes out in the future is taken as now; one more than a minute old is
//! not believed and the handler's clock is used.
//!
//! Elsewhere than Linux, [`Stamped`] is the bare stream and every request
//! is stamped by the handler's clock, as before.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// When the request's bytes arrived, by the kernel's receive stamp (see
/// the module's documentation); absent when it cannot be attributed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Arrived(pub(crate) Instant);

/// The receive time of a connection's last read, as an `Instant`; `None`
/// when that read carried no timestamp.
#[derive(Debug, Default)]
pub(crate) struct Cell(Mutex<Option<Instant>>);

impl Cell {
    fn set(&self, at: Option<Instant>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = at;
    }

    fn get(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Asks the kernel to stamp what `socket` receives (on a listener, the
/// sockets it accepts inherit it). Elsewhere than Linux, does nothing.
pub(crate) fn enable<S: std::os::fd::AsRawFd>(socket: &S) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt reads the one c_int it is given, on a socket
        // `socket` owns.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
    Ok(())
}

/// A TCP stream whose reads keep their kernel receive time in a [`Cell`].
pub(crate) struct Stamped {
    tcp: TcpStream,
    cell: Arc<Cell>,
}

impl Stamped {
    /// Wraps an accepted stream, enabling its timestamps; the cell is the
    /// one [`Stamp`] reads.
    pub(crate) fn new(tcp: TcpStream) -> (Stamped, Arc<Cell>) {
        if let Err(err) = enable(&tcp) {
            tracing::debug!("cannot enable receive timestamps: {err}; arrivals are stamped by the handler");
        }
        let cell = Arc::new(Cell::default());
        (Stamped { tcp, cell: cell.clone() }, cell)
    }
}

#[cfg(target_os = "linux")]
impl AsyncRead for Stamped {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        use std::os::fd::AsRawFd;
        let this = self.get_mut();
        let fd = this.tcp.as_raw_fd();
        loop {
            std::task::ready!(this.tcp.poll_read_ready(cx))?;
            // SAFETY: recvmsg only writes into the unfilled part, and only
            // the `n` bytes it reports are marked initialised below.
            let unfilled = unsafe { buf.unfilled_mut() };
            match this.tcp.try_io(tokio::io::Interest::READABLE, || recv_stamped(fd, unfilled)) {
                Ok((n, stamp)) => {
                    // SAFETY: the kernel wrote these `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    if n > 0 {
                        this.cell.set(stamp.and_then(to_instant));
                    }
                    return Poll::Ready(Ok(()));
                }
                // try_io cleared the readiness: wait for the next.
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
impl AsyncRead for Stamped {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stamped {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

/// A kernel receive stamp: `CLOCK_REALTIME` in ns since the epoch.
#[cfg(target_os = "linux")]
type RealtimeNs = i128;

/// One `recvmsg` into `buf`: the bytes read and the receive stamp of the
/// last segment they came from, if the kernel gave one.
#[cfg(target_os = "linux")]
fn recv_stamped(
    fd: std::os::fd::RawFd,
    buf: &mut [std::mem::MaybeUninit<u8>],
) -> io::Result<(usize, Option<RealtimeNs>)> {
    // Room for one cmsghdr and a timespec of either layout, aligned for cmsghdr.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: an all-zero msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: msg points at one iovec over `buf` and at `control`, both
    // alive for the call and of the lengths given.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the kernel filled msg_control up to msg_controllen with
    // well-formed cmsghdrs; the CMSG macros walk within it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            let header = &*cmsg;
            if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_TIMESTAMPNS {
                let data = libc::CMSG_DATA(cmsg);
                let len = header.cmsg_len as usize - (data as usize - cmsg as usize);
                // `struct timespec` of the C library: two 64-bit fields, or
                // (32-bit time) two 32-bit ones.
                stamp = match len {
                    16 => {
                        let [secs, nanos] = std::ptr::read_unaligned(data.cast::<[i64; 2]>());
                        Some(i128::from(secs) * 1_000_000_000 + i128::from(nanos))
                    }
                    8 => {
                        let [secs, nanos] = std::ptr::read_unaligned(data.cast::<[i32; 2]>());
                        Some(i128::from(secs) * 1_000_000_000 + i128::from(nanos))
                    }
                    _ => None,
                };
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok((n as usize, stamp.filter(|ns| *ns > 0)))
}

/// `CLOCK_REALTIME` now, in ns since the epoch.
#[cfg(target_os = "linux")]
fn realtime_ns() -> RealtimeNs {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the one timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &raw mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// A stamp older than this is not believed (a stepped clock, most likely).
#[cfg(target_os = "linux")]
const OLDEST: std::time::Duration = std::time::Duration::from_secs(60);

/// The kernel's realtime `stamp` on the monotonic clock: now, less its age
/// on the realtime clock (see the module's documentation for the error).
#[cfg(target_os = "linux")]
fn to_instant(stamp: RealtimeNs) -> Option<Instant> {
    let before = realtime_ns();
    let now = Instant::now();
    let after = realtime_ns();
    let age = (before + (after - before) / 2 - stamp).max(0);
    let age = std::time::Duration::from_nanos(u64::try_from(age).ok()?);
    if age > OLDEST {
        return None;
    }
    now.checked_sub(age)
}

/// The hyper service of one connection: `inner`, with each HTTP/1.x
/// request given its [`Arrived`] from the connection's [`Cell`] as hyper
/// dispatches it (before the service's future is first polled, when the
/// body may have been read too).
#[derive(Clone)]
pub(crate) struct Stamp<S> {
    pub(crate) inner: S,
    pub(crate) cell: Arc<Cell>,
}

impl<S, B> hyper::service::Service<axum::http::Request<B>> for Stamp<S>
where
    S: hyper::service::Service<axum::http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: axum::http::Request<B>) -> Self::Future {
        // HTTP/2 is multiplexed: the last read may be another stream's, so
        // its requests keep the handler's clock (see the module's documentation).
        if req.version() < axum::http::Version::HTTP_2
            && let Some(at) = self.cell.get()
        {
            req.extensions_mut().insert(Arrived(at));
        }
        self.inner.call(req)
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_converts_to_the_instant_of_its_age() {
        let now = Instant::now();
        let stamp = to_instant(realtime_ns() - 50_000_000).unwrap();
        let age = now.saturating_duration_since(stamp);
        assert!(age.as_millis().abs_diff(50) <= 5, "{age:?}");
        let future = to_instant(realtime_ns() + 1_000_000_000).unwrap();
        assert!(future >= now, "a stamp in the future is now");
        assert_eq!(to_instant(realtime_ns() - 3_600_000_000_000), None, "an hour old is not believed");
    }
}
