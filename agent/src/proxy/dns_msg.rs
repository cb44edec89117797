//! DNS messages as the proxy judges them, pure and separate from the sockets so hostile input
//! can be thrown at them directly (see agent/tests/hostile_input.rs): which datagrams are
//! queries worth forwarding, which upstream datagrams answer them, and the SERVFAIL the agent
//! gives when the server does not.

/// Largest UDP DNS message (EDNS0 allows up to 65535 bytes).
pub const MAX_MSG: usize = 65_535;
/// The fixed header every DNS message starts with.
pub const HEADER: usize = 12;

/// Whether a datagram from an app is a query the proxy forwards. Anything else is dropped:
/// too short to be DNS, or a response (QR set), which no server expects to receive.
pub fn check_query(msg: &[u8]) -> Result<(), &'static str> {
    if msg.len() < HEADER {
        return Err("shorter than a DNS header");
    }
    if msg.len() > MAX_MSG {
        return Err("larger than any DNS message");
    }
    if msg[2] & 0x80 != 0 {
        return Err("a response, not a query");
    }
    Ok(())
}

/// Whether `reply` from upstream answers `query`: a whole header, a response, same id.
pub fn is_reply_to(query: &[u8], reply: &[u8]) -> bool {
    query.len() >= 2 && reply.len() >= HEADER && reply[2] & 0x80 != 0 && reply[..2] == query[..2]
}

/// A SERVFAIL answer to `query`: same id, opcode, RD and question; QR and RA set; no records.
/// None for a message too malformed to answer.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let qdcount = u16::from_be_bytes([query[4], query[5]]);
    // Walk the question section to know how much of it to echo.
    let mut pos = 12;
    for _ in 0..qdcount {
        loop {
            let len = *query.get(pos)? as usize;
            if len == 0 {
                pos += 1;
                break;
            }
            if len & 0xc0 != 0 {
                // A compression pointer ends the name.
                pos += 2;
                break;
            }
            pos += 1 + len;
        }
        pos += 4;
        if pos > query.len() {
            return None;
        }
    }
    let mut out = query[..pos].to_vec();
    out[2] = 0x80 | (query[2] & 0x79); // QR, opcode, RD; AA and TC cleared
    out[3] = 0x80 | 0x02; // RA, RCODE=SERVFAIL
    out[6..12].fill(0);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str) -> Vec<u8> {
        let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        // An EDNS OPT record in the additional section, which a SERVFAIL must not echo.
        q.extend_from_slice(&[0, 0, 41, 16, 0, 0, 0, 0, 0, 0, 0]);
        q
    }

    #[test]
    fn servfail_echoes_the_question_only() {
        let q = query("demo.sockmesh.test");
        let r = servfail(&q).expect("answerable");
        assert_eq!(&r[..2], &[0xab, 0xcd]);
        assert_eq!(r[2], 0x81, "QR and RD");
        assert_eq!(r[3] & 0x0f, 2, "SERVFAIL");
        assert_eq!(&r[4..6], &[0, 1], "one question");
        assert_eq!(&r[6..12], &[0; 6], "no records");
        assert_eq!(r.len(), 12 + 20 + 4);
    }

    #[test]
    fn only_queries_are_forwarded() {
        assert!(check_query(&query("a.b")).is_ok());
        assert!(check_query(&[0; 11]).is_err());
        let mut r = query("a.b");
        r[2] |= 0x80;
        assert_eq!(check_query(&r), Err("a response, not a query"));
        assert!(check_query(&vec![0; MAX_MSG + 1]).is_err());
    }

    #[test]
    fn a_reply_is_a_response_with_the_query_id() {
        let q = query("a.b");
        let mut r = q.clone();
        assert!(!is_reply_to(&q, &r), "an echo of the query is no answer");
        r[2] |= 0x80;
        assert!(is_reply_to(&q, &r));
        r[1] ^= 1;
        assert!(!is_reply_to(&q, &r), "another id");
        assert!(!is_reply_to(&q, &r[..11]));
        assert!(!is_reply_to(&[], &r));
    }

    #[test]
    fn servfail_refuses_garbage() {
        assert_eq!(servfail(&[]), None);
        assert_eq!(servfail(&[0; 11]), None);
        let mut q = query("a.b");
        q[2] |= 0x80; // a response, not a query
        assert_eq!(servfail(&q), None);
        let mut q = query("a.b");
        q.truncate(14); // question cut short
        assert_eq!(servfail(&q), None);
        let mut q = query("a.b");
        q[5] = 200; // claims 200 questions
        assert_eq!(servfail(&q), None);
    }
}

#[cfg(test)]
#[path = "dns_msg_tests.rs"]
mod hostile;
