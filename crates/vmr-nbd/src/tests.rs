//! Unit tests against a scripted (and often hostile) fake server over an in-memory duplex pipe.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

const SIZE: u64 = 1 << 20;
const ALLOC_ID: u32 = 7;

fn opts() -> ConnectOptions {
    ConnectOptions {
        meta_contexts: vec![BASE_ALLOCATION.to_owned()],
        timeout: Duration::from_secs(5),
        ..ConnectOptions::default()
    }
}

async fn opt_reply(s: &mut DuplexStream, option: u32, kind: u32, data: &[u8]) {
    let mut b = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}

/// Read one client option: (option, data).
async fn read_option(s: &mut DuplexStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).await.unwrap();
    assert_eq!(be64(&h[0..8]), IHAVEOPT);
    let mut d = vec![0u8; be32(&h[12..16]) as usize];
    s.read_exact(&mut d).await.unwrap();
    (be32(&h[8..12]), d)
}

/// A well-behaved server handshake: structured replies, `base:allocation` as id 7, a writable
/// export of `SIZE` bytes with trim/flush/write zeroes/fua.
async fn server_handshake(s: &mut DuplexStream) {
    let mut g = NBD_MAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&g).await.unwrap();
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf).await.unwrap();
    assert_eq!(
        u32::from_be_bytes(cf),
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
    );
    loop {
        let (opt, _data) = read_option(s).await;
        match opt {
            OPT_STRUCTURED_REPLY => opt_reply(s, opt, REP_ACK, &[]).await,
            OPT_SET_META_CONTEXT => {
                let mut d = ALLOC_ID.to_be_bytes().to_vec();
                d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                opt_reply(s, opt, REP_META_CONTEXT, &d).await;
                opt_reply(s, opt, REP_ACK, &[]).await;
            }
            OPT_GO => {
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&SIZE.to_be_bytes());
                let f = TFLAG_HAS_FLAGS
                    | TFLAG_SEND_FLUSH
                    | TFLAG_SEND_FUA
                    | TFLAG_SEND_TRIM
                    | TFLAG_SEND_WRITE_ZEROES;
                d.extend_from_slice(&f.to_be_bytes());
                opt_reply(s, opt, REP_INFO, &d).await;
                let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [1u32, 4096, 1 << 20] {
                    b.extend_from_slice(&v.to_be_bytes());
                }
                opt_reply(s, opt, REP_INFO, &b).await;
                opt_reply(s, opt, REP_ACK, &[]).await;
                return;
            }
            o => panic!("unexpected option {o}"),
        }
    }
}

async fn read_request(s: &mut DuplexStream) -> Request {
    let mut b = [0u8; REQUEST_LEN];
    s.read_exact(&mut b).await.unwrap();
    let r = Request::decode(&b).unwrap();
    if r.cmd == CMD_WRITE {
        let mut p = vec![0u8; r.length as usize];
        s.read_exact(&mut p).await.unwrap();
    }
    r
}

async fn chunk(s: &mut DuplexStream, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
    let h = ChunkHeader {
        flags,
        kind,
        cookie,
        length: payload.len() as u32,
    };
    s.write_all(&h.encode()).await.unwrap();
    s.write_all(payload).await.unwrap();
}

fn data_payload(off: u64, data: &[u8]) -> Vec<u8> {
    let mut p = off.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    p
}

/// Start a client against a fake server running `script` after the handshake.
async fn with_server<F, Fut>(script: F) -> (NbdClient, tokio::task::JoinHandle<()>)
where
    F: FnOnce(DuplexStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (c, mut s) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        server_handshake(&mut s).await;
        script(s).await;
    });
    let client = NbdClient::connect_stream(c, opts()).await.unwrap();
    (client, server)
}

#[tokio::test]
async fn handshake_learns_export() {
    let (c, _s) = with_server(|s| async move {
        let _keep = s;
        tokio::time::sleep(Duration::from_secs(10)).await;
    })
    .await;
    assert_eq!(c.size(), SIZE);
    assert_eq!(c.meta_context_id(BASE_ALLOCATION), Some(ALLOC_ID));
    assert_eq!(
        c.block_size(),
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: 1 << 20
        }
    );
    assert_eq!(c.max_request(), 1 << 20);
    assert!(c.can_trim() && c.can_flush() && c.can_write_zeroes() && !c.is_read_only());
    // Checked before anything is sent.
    assert!(matches!(
        c.read(0, (1 << 20) + 1).await,
        Err(NbdError::TooLarge { .. })
    ));
    assert!(matches!(
        c.read(SIZE - 10, 11).await,
        Err(NbdError::OutOfRange { .. })
    ));
    assert!(matches!(
        c.trim(u64::MAX, 2).await,
        Err(NbdError::OutOfRange { .. })
    ));
    assert!(matches!(
        c.block_status("nope", 0, 1).await,
        Err(NbdError::Unsupported(_))
    ));
}

#[tokio::test]
async fn data_and_hole_chunks_out_of_order_replies() {
    let (c, _s) = with_server(|mut s| async move {
        let a = read_request(&mut s).await;
        let b = read_request(&mut s).await;
        // Answer the second request first; split the first into hole + data.
        chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            b.cookie,
            &data_payload(b.offset, &[9u8; 16]),
        )
        .await;
        let mut hole = (a.offset + 8).to_be_bytes().to_vec();
        hole.extend_from_slice(&8u32.to_be_bytes());
        chunk(&mut s, 0, REPLY_TYPE_OFFSET_HOLE, a.cookie, &hole).await;
        chunk(
            &mut s,
            0,
            REPLY_TYPE_OFFSET_DATA,
            a.cookie,
            &data_payload(a.offset, &[1u8; 8]),
        )
        .await;
        chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_NONE, a.cookie, &[]).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    })
    .await;
    let (ra, rb) = tokio::join!(c.read(4096, 16), async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.read(8192, 16).await
    });
    let mut want = vec![1u8; 8];
    want.extend_from_slice(&[0u8; 8]);
    assert_eq!(ra.unwrap().as_ref(), &want[..]);
    assert_eq!(rb.unwrap().as_ref(), &[9u8; 16]);
}

#[tokio::test]
async fn error_chunk_is_server_error() {
    let (c, _s) = with_server(|mut s| async move {
        let a = read_request(&mut s).await;
        let mut p = 22u32.to_be_bytes().to_vec();
        p.extend_from_slice(&(5u16).to_be_bytes());
        p.extend_from_slice(b"nope!");
        chunk(&mut s, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, a.cookie, &p).await;
        let b = read_request(&mut s).await;
        s.write_all(
            &SimpleReply {
                error: 28,
                cookie: b.cookie,
            }
            .encode(),
        )
        .await
        .unwrap();
        let c = read_request(&mut s).await;
        s.write_all(
            &SimpleReply {
                error: 0,
                cookie: c.cookie,
            }
            .encode(),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
    })
    .await;
    let e = c.read(0, 512).await.unwrap_err();
    assert_eq!(e.errno(), Some(22));
    assert!(e.to_string().contains("nope!"), "{e}");
    let e = c
        .write(0, Bytes::from_static(&[1; 512]), true)
        .await
        .unwrap_err();
    assert_eq!(e.errno(), Some(28));
    // Errors from the server do not poison the connection.
    c.flush().await.unwrap();
}

#[tokio::test]
async fn block_status_parsed_and_validated() {
    let (c, _s) = with_server(|mut s| async move {
        let a = read_request(&mut s).await;
        assert_eq!(a.cmd, CMD_BLOCK_STATUS);
        let mut p = ALLOC_ID.to_be_bytes().to_vec();
        for (l, f) in [(4096u32, 0u32), (8192, 3)] {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            a.cookie,
            &p,
        )
        .await;
        // Second: length not 4 + 8n.
        let b = read_request(&mut s).await;
        chunk(
            &mut s,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            b.cookie,
            &[0u8; 13],
        )
        .await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    })
    .await;
    let x = c.block_status(BASE_ALLOCATION, 0, 65536).await.unwrap();
    assert_eq!(
        x,
        vec![
            StatusExtent {
                offset: 0,
                length: 4096,
                flags: 0
            },
            StatusExtent {
                offset: 4096,
                length: 8192,
                flags: 3
            }
        ]
    );
    let e = c.block_status(BASE_ALLOCATION, 0, 65536).await.unwrap_err();
    let fault = ProtocolFault::ChunkLength {
        command: "block_status",
        kind: REPLY_TYPE_BLOCK_STATUS,
        length: 13,
    };
    assert!(matches!(&e, NbdError::Protocol(f) if *f == fault), "{e:?}");
    // The connection is now dead for everyone, and says why.
    let later = c.flush().await.unwrap_err();
    assert!(
        matches!(&later, NbdError::Protocol(f) if *f == fault),
        "{later:?}"
    );
    assert!(!c.is_connected());
}

/// Run one hostile reply to a read and return the client's error.
async fn hostile_read<F>(reply: F) -> NbdError
where
    F: FnOnce(Request) -> Vec<u8> + Send + 'static,
{
    let (c, _s) = with_server(|mut s| async move {
        let a = read_request(&mut s).await;
        s.write_all(&reply(a)).await.unwrap();
        // Some scripts are truncated: close the stream after a moment.
        tokio::time::sleep(Duration::from_millis(50)).await;
    })
    .await;
    let e = c.read(4096, 4096).await.unwrap_err();
    // Whatever happened, later requests fail too and never hang.
    let later = c.flush().await.unwrap_err();
    assert!(!matches!(later, NbdError::Timeout), "{later:?}");
    e
}

fn hdr(kind: u16, flags: u16, cookie: u64, length: u32) -> Vec<u8> {
    ChunkHeader {
        flags,
        kind,
        cookie,
        length,
    }
    .encode()
    .to_vec()
}

#[tokio::test]
async fn hostile_bad_magic() {
    let e = hostile_read(|_| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]).await;
    assert!(
        matches!(
            e,
            NbdError::Protocol(ProtocolFault::BadReplyMagic(0xdead_beef))
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn hostile_huge_data_length() {
    let e =
        hostile_read(|r| hdr(REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE, r.cookie, u32::MAX)).await;
    assert!(
        matches!(
            e,
            NbdError::Protocol(ProtocolFault::ChunkLength {
                command: "read",
                length: u32::MAX,
                ..
            })
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn hostile_unknown_cookie() {
    let e = hostile_read(|r| hdr(REPLY_TYPE_NONE, REPLY_FLAG_DONE, r.cookie + 1000, 0)).await;
    assert!(
        matches!(e, NbdError::Protocol(ProtocolFault::UnknownCookie(_))),
        "{e:?}"
    );
}

#[tokio::test]
async fn hostile_truncated_chunk() {
    let e = hostile_read(|r| {
        let mut b = hdr(REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE, r.cookie, 8 + 4096);
        b.extend_from_slice(&r.offset.to_be_bytes());
        b.extend_from_slice(&[0u8; 100]);
        b
    })
    .await;
    assert!(matches!(e, NbdError::Io(_) | NbdError::Closed), "{e:?}");
}

#[tokio::test]
async fn hostile_data_outside_range() {
    let e = hostile_read(|r| {
        let mut b = hdr(REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE, r.cookie, 8 + 4096);
        b.extend_from_slice(&(r.offset + 1).to_be_bytes());
        b.extend_from_slice(&[0u8; 4096]);
        b
    })
    .await;
    let fault = ProtocolFault::ChunkOutsideRequest {
        offset: 4097,
        len: 4096,
        req_offset: 4096,
        req_len: 4096,
    };
    assert!(matches!(&e, NbdError::Protocol(f) if *f == fault), "{e:?}");
}

#[tokio::test]
async fn hostile_repeated_chunks_exceed_length() {
    let e = hostile_read(|r| {
        let mut b = Vec::new();
        for _ in 0..3 {
            b.extend_from_slice(&hdr(REPLY_TYPE_OFFSET_DATA, 0, r.cookie, 8 + 4096));
            b.extend_from_slice(&r.offset.to_be_bytes());
            b.extend_from_slice(&[0u8; 4096]);
        }
        b
    })
    .await;
    assert!(
        matches!(e, NbdError::Protocol(ProtocolFault::ReadOvercovered)),
        "{e:?}"
    );
}

#[tokio::test]
async fn hostile_short_coverage() {
    let e = hostile_read(|r| {
        let mut b = hdr(REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE, r.cookie, 8 + 100);
        b.extend_from_slice(&r.offset.to_be_bytes());
        b.extend_from_slice(&[0u8; 100]);
        b
    })
    .await;
    assert!(
        matches!(
            e,
            NbdError::Protocol(ProtocolFault::ReadEnd {
                end: 4196,
                expected: 8192
            })
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn hostile_error_message_length() {
    let e = hostile_read(|r| {
        let mut b = hdr(REPLY_TYPE_ERROR, REPLY_FLAG_DONE, r.cookie, 6 + 10);
        b.extend_from_slice(&5u32.to_be_bytes());
        b.extend_from_slice(&60000u16.to_be_bytes());
        b.extend_from_slice(&[b'x'; 10]);
        b
    })
    .await;
    assert!(
        matches!(
            e,
            NbdError::Protocol(ProtocolFault::ErrorMessageTooLong { len: 60000, .. })
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn hostile_block_status_chunk_for_read() {
    let e = hostile_read(|r| {
        let mut b = hdr(REPLY_TYPE_BLOCK_STATUS, REPLY_FLAG_DONE, r.cookie, 12);
        b.extend_from_slice(&[0u8; 12]);
        b
    })
    .await;
    assert!(
        matches!(
            e,
            NbdError::Protocol(ProtocolFault::UnexpectedChunk {
                command: "read",
                kind: REPLY_TYPE_BLOCK_STATUS
            })
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn hostile_simple_reply_to_structured_read() {
    let e = hostile_read(|r| {
        SimpleReply {
            error: 0,
            cookie: r.cookie,
        }
        .encode()
        .to_vec()
    })
    .await;
    assert!(
        matches!(
            e,
            NbdError::Protocol(ProtocolFault::SimpleReplyNotAllowed("read"))
        ),
        "{e:?}"
    );
}

#[tokio::test]
async fn server_closes_mid_request() {
    let (c, s) = with_server(|mut s| async move {
        let _ = read_request(&mut s).await;
        drop(s);
    })
    .await;
    let e = c.read(0, 4096).await.unwrap_err();
    assert!(matches!(e, NbdError::Closed | NbdError::Io(_)), "{e:?}");
    s.await.unwrap();
    assert!(matches!(c.read(0, 4096).await, Err(NbdError::Closed)));
}

#[tokio::test]
async fn silent_server_times_out_then_closed() {
    let (c, mut s) = tokio::io::duplex(1 << 16);
    let _server = tokio::spawn(async move {
        server_handshake(&mut s).await;
        let _ = read_request(&mut s).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    let o = ConnectOptions {
        timeout: Duration::from_millis(200),
        ..opts()
    };
    let c = NbdClient::connect_stream(c, o).await.unwrap();
    assert!(matches!(c.flush().await, Err(NbdError::Timeout)));
    assert!(matches!(c.flush().await, Err(NbdError::Closed)));
}

/// Run a hostile handshake script and return the connect error.
async fn hostile_handshake(bytes: Vec<u8>) -> NbdError {
    hostile_handshake_then(bytes, false).await
}

async fn hostile_handshake_then(bytes: Vec<u8>, close: bool) -> NbdError {
    let (c, mut s) = tokio::io::duplex(1 << 16);
    let _server = tokio::spawn(async move {
        s.write_all(&bytes).await.unwrap();
        if close {
            return;
        }
        let mut sink = vec![0u8; 4096];
        while s.read(&mut sink).await.unwrap_or(0) > 0 {}
    });
    NbdClient::connect_stream(c, opts()).await.unwrap_err()
}

fn greeting() -> Vec<u8> {
    let mut g = NBD_MAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

fn raw_opt_reply(option: u32, kind: u32, len: u32, data: &[u8]) -> Vec<u8> {
    let mut b = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    b
}

#[tokio::test]
async fn hostile_handshakes() {
    let e = hostile_handshake(b"NOTNBD!!xxxxxxxxxx".to_vec()).await;
    assert!(
        matches!(e, NbdError::Handshake(HandshakeFault::BadServerMagic(_))),
        "{e:?}"
    );

    let mut g = greeting();
    g.extend_from_slice(&raw_opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, u32::MAX, &[]));
    let e = hostile_handshake(g).await;
    assert!(
        matches!(
            e,
            NbdError::Handshake(HandshakeFault::BadLength {
                what: "option reply",
                len: 0xffff_ffff
            })
        ),
        "{e:?}"
    );

    let mut g = greeting();
    g.extend_from_slice(&raw_opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, 0, &[]));
    g.extend_from_slice(&raw_opt_reply(OPT_SET_META_CONTEXT, REP_ACK, 0, &[]));
    g.extend_from_slice(&raw_opt_reply(
        OPT_GO,
        REP_FLAG_ERROR | 6,
        14,
        b"no such export",
    ));
    let e = hostile_handshake(g).await;
    match e {
        NbdError::OptionRefused {
            option, message, ..
        } => {
            assert_eq!(option, OPT_GO);
            assert_eq!(message, "no such export");
        }
        e => panic!("{e:?}"),
    }

    // Ack without export info.
    let mut g = greeting();
    g.extend_from_slice(&raw_opt_reply(OPT_STRUCTURED_REPLY, REP_ACK, 0, &[]));
    g.extend_from_slice(&raw_opt_reply(OPT_SET_META_CONTEXT, REP_ACK, 0, &[]));
    g.extend_from_slice(&raw_opt_reply(OPT_GO, REP_ACK, 0, &[]));
    let e = hostile_handshake(g).await;
    assert!(
        matches!(e, NbdError::Handshake(HandshakeFault::NoExportInfo)),
        "{e:?}"
    );

    // Truncated greeting.
    let e = hostile_handshake_then(NBD_MAGIC.to_be_bytes().to_vec(), true).await;
    assert!(matches!(e, NbdError::Io(_)), "{e:?}");
}
