//! Receiving datagrams with the kernel's count of what it dropped: with SO_RXQ_OVFL set, every
//! recvmsg() carries how many datagrams the socket has dropped so far because its receive
//! buffer was full. A listener that reads slowly on purpose (a rate limit) learns exactly
//! what its holding back cost, without reading the excess itself.
use std::{
    io,
    mem::{size_of, zeroed},
    net::SocketAddr,
    os::fd::{AsRawFd, BorrowedFd},
};

/// Turns on the drop count for `fd` (a UDP socket).
pub fn count_drops(fd: BorrowedFd<'_>) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int pointer and its size on an fd the caller owns.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RXQ_OVFL,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One datagram received without blocking: its length (cut to `buf`), its source, and the
/// socket's drop count so far if the kernel sent one (only once it is non-zero).
pub fn recv_from(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<u32>)> {
    // SAFETY: sockaddr_storage is plain integers; all zeroes is a valid value.
    let mut from: libc::sockaddr_storage = unsafe { zeroed() };
    // u64-aligned room for one u32 control message (CMSG_SPACE(4) is 24 bytes on 64-bit).
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain integers and pointers; all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 4]>() as _;
    // SAFETY: every pointer in `msg` points into a live local of the size given with it.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `from` up to msg_namelen, within its size.
    let addr = unsafe { socket2::SockAddr::new(from, msg.msg_namelen) };
    let from = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("datagram from a non-IP address"))?;
    let mut dropped = None;
    // SAFETY: CMSG_* walk the control buffer the kernel filled, bounded by msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SO_RXQ_OVFL {
                dropped = Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>()));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, from, dropped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{net::UdpSocket, os::fd::AsFd};

    #[test]
    fn drops_of_a_full_buffer_are_counted() {
        let rx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        socket2::SockRef::from(&rx)
            .set_recv_buffer_size(4096)
            .expect("small buffer");
        count_drops(rx.as_fd()).expect("SO_RXQ_OVFL");
        let tx = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = rx.local_addr().expect("addr");
        let mut buf = [0u8; 64];
        assert_eq!(
            recv_from(rx.as_fd(), &mut buf)
                .expect_err("nothing yet")
                .kind(),
            io::ErrorKind::WouldBlock
        );
        for i in 0..200u8 {
            tx.send_to(&[i; 32], to).expect("send");
        }
        let (n, from, dropped) = recv_from(rx.as_fd(), &mut buf).expect("one");
        assert_eq!((n, from), (32, tx.local_addr().expect("addr")));
        assert_eq!(dropped, None, "queued before anything was dropped");
        let mut kept = 1;
        while recv_from(rx.as_fd(), &mut buf).is_ok() {
            kept += 1;
        }
        assert!(kept < 200, "a 4 KiB buffer cannot hold 200 datagrams");
        // The next datagram queued carries the count so far.
        tx.send_to(b"after", to).expect("send");
        let (_, _, dropped) = recv_from(rx.as_fd(), &mut buf).expect("one more");
        assert_eq!(dropped, Some(200 - kept), "kept {kept}");
    }
}
