//! AF_PACKET sockets: send hand-picked frames out of an interface and capture what arrives,
//! for the malformed-frame scenario. Create them inside the namespace (`Netns::run`).
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::bail;

pub struct RawSocket {
    fd: OwnedFd,
}

const ETH_P_ALL: u16 = 0x0003;

impl RawSocket {
    /// A socket bound to interface `iface` (in the calling thread's namespace), all protocols.
    pub fn bind(iface: &str) -> anyhow::Result<Self> {
        Self::open(iface, ETH_P_ALL)
    }

    /// A socket that only sends (protocol 0: nothing is queued for it to receive), for floods.
    pub fn sender(iface: &str) -> anyhow::Result<Self> {
        Self::open(iface, 0)
    }

    fn open(iface: &str, protocol: u16) -> anyhow::Result<Self> {
        let name = std::ffi::CString::new(iface)?;
        // SAFETY: plain libc calls with valid arguments; the fd is owned right away.
        unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr());
            if ifindex == 0 {
                bail!("no interface {iface}");
            }
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                i32::from(protocol.to_be()),
            );
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = protocol.to_be();
            sll.sll_ifindex = ifindex as i32;
            let rc = libc::bind(
                fd.as_raw_fd(),
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            if rc != 0 {
                bail!(
                    "binding AF_PACKET to {iface}: {}",
                    std::io::Error::last_os_error()
                );
            }
            Ok(RawSocket { fd })
        }
    }

    /// Sets the receive buffer to `bytes` (SO_RCVBUFFORCE: past the sysctl's cap, as root),
    /// so a capture of a bulk transfer keeps more than a few jumbo frames.
    pub fn set_receive_buffer(&self, bytes: i32) -> anyhow::Result<()> {
        // SAFETY: a valid option value of its size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as u32,
            )
        };
        if rc != 0 {
            bail!("SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends one whole Ethernet frame.
    pub fn send(&self, frame: &[u8]) -> anyhow::Result<()> {
        // SAFETY: `frame` is a valid buffer of its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            bail!("sending a raw frame: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends one frame, waiting (up to a second) while the device queue is full.
    pub fn send_waiting(&self, frame: &[u8]) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            // SAFETY: `frame` is a valid buffer of its length.
            let n =
                unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if n >= 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            let full = matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::ENOBUFS));
            if !full || std::time::Instant::now() >= deadline {
                bail!("sending a raw frame: {e}");
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    /// Every frame received so far that was not sent by this host (non-blocking drain).
    pub fn drain(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            // Room for a jumbo frame (a 9000-byte MTU and more).
            let mut buf = vec![0u8; 16 * 1024];
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: valid buffers and lengths.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n <= 0 {
                break;
            }
            if sll.sll_pkttype != libc::PACKET_OUTGOING {
                buf.truncate(n as usize);
                out.push(buf);
            }
        }
        out
    }
}
