//! Fixed-newstyle negotiation: greeting, `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT`
//! and `NBD_OPT_GO` (with `NBD_INFO_BLOCK_SIZE`). Produces the [`ExportInfo`] the transmission
//! phase runs with. Every server length is checked against a small cap before anything is read.

use std::collections::HashMap;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{HandshakeFault, NbdError};
use crate::proto::*;

/// Largest option reply payload accepted (info replies with names/descriptions are the largest
/// legitimate ones: 2 + 4096 bytes).
const MAX_OPTION_REPLY: u32 = 2 * MAX_STRING as u32 + 64;
/// Largest number of meta context replies accepted for one `SET_META_CONTEXT`.
const MAX_META_REPLIES: usize = 1024;
/// Largest number of option replies accepted for one `NBD_OPT_GO`.
const MAX_INFO_REPLIES: usize = 1024;

/// Block size constraints of an export (`NBD_INFO_BLOCK_SIZE`, or defaults when not sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Minimum block size (alignment of offsets and lengths), a power of two.
    pub minimum: u32,
    /// Preferred block size (a power of two >= minimum).
    pub preferred: u32,
    /// Maximum payload of a single read or write.
    pub maximum: u32,
}

impl Default for BlockSize {
    fn default() -> Self {
        Self {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        }
    }
}

/// What the handshake learned about the export.
#[derive(Debug, Clone)]
pub(crate) struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub block_size: BlockSize,
    pub structured: bool,
    pub contexts: HashMap<String, u32>,
}

/// One parsed option reply.
struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

fn hs(fault: HandshakeFault) -> NbdError {
    NbdError::Handshake(fault)
}

async fn send_option<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    let len =
        u32::try_from(data.len()).map_err(|_| hs(HandshakeFault::OptionDataTooLong(data.len())))?;
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await?;
    s.flush().await?;
    Ok(())
}

async fn read_reply<S: AsyncRead + Unpin>(s: &mut S, option: u32) -> Result<OptReply, NbdError> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).await?;
    let magic = be64(&h[0..8]);
    if magic != OPT_REPLY_MAGIC {
        return Err(hs(HandshakeFault::BadReplyMagic(magic)));
    }
    let got = be32(&h[8..12]);
    if got != option {
        return Err(hs(HandshakeFault::ReplyForOtherOption {
            got,
            expected: option,
        }));
    }
    let kind = be32(&h[12..16]);
    let len = be32(&h[16..20]);
    if len > MAX_OPTION_REPLY {
        return Err(hs(HandshakeFault::BadLength {
            what: "option reply",
            len: len as usize,
        }));
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).await?;
    if kind & REP_FLAG_ERROR != 0 {
        if data.len() > MAX_STRING {
            return Err(hs(HandshakeFault::BadLength {
                what: "option error message",
                len: data.len(),
            }));
        }
        return Err(NbdError::OptionRefused {
            option,
            reply: kind,
            message: String::from_utf8_lossy(&data).into_owned(),
        });
    }
    Ok(OptReply { kind, data })
}

fn name_field(name: &str) -> Result<Vec<u8>, NbdError> {
    if name.len() > MAX_STRING {
        return Err(hs(HandshakeFault::NameTooLong {
            len: name.len(),
            max: MAX_STRING,
        }));
    }
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    Ok(b)
}

/// Run the whole negotiation on `s`. When the server refuses an option, `NBD_OPT_ABORT` is
/// sent (best effort) so the server ends the session cleanly.
pub(crate) async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    meta_contexts: &[String],
) -> Result<ExportInfo, NbdError> {
    let res = negotiate_inner(s, export, meta_contexts).await;
    if let Err(NbdError::OptionRefused { .. }) = &res {
        let _ = send_option(s, OPT_ABORT, &[]).await;
    }
    res
}

async fn negotiate_inner<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    export: &str,
    meta_contexts: &[String],
) -> Result<ExportInfo, NbdError> {
    // Greeting.
    let mut g = [0u8; 18];
    s.read_exact(&mut g[..16]).await?;
    let magic = be64(&g[0..8]);
    if magic != NBD_MAGIC {
        return Err(hs(HandshakeFault::BadServerMagic(magic)));
    }
    let second = be64(&g[8..16]);
    if second == OLDSTYLE_MAGIC {
        return Err(hs(HandshakeFault::OldStyle));
    }
    if second != IHAVEOPT {
        return Err(hs(HandshakeFault::BadNewstyleMagic(second)));
    }
    s.read_exact(&mut g[16..18]).await?;
    let hflags = be16(&g[16..18]);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(hs(HandshakeFault::NotFixedNewstyle));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).await?;

    // Structured replies.
    send_option(s, OPT_STRUCTURED_REPLY, &[]).await?;
    let structured = match read_reply(s, OPT_STRUCTURED_REPLY).await {
        Ok(r) if r.kind == REP_ACK && r.data.is_empty() => true,
        Ok(r) => {
            return Err(hs(HandshakeFault::UnexpectedReply {
                option: "structured reply",
                reply: r.kind,
            }));
        }
        Err(NbdError::OptionRefused { reply, .. })
            if reply == REP_ERR_UNSUP && meta_contexts.is_empty() =>
        {
            false
        }
        Err(e) => return Err(e),
    };

    // Meta contexts.
    let mut contexts = HashMap::new();
    if !meta_contexts.is_empty() {
        let mut d = name_field(export)?;
        d.extend_from_slice(&(meta_contexts.len() as u32).to_be_bytes());
        for q in meta_contexts {
            d.extend_from_slice(&name_field(q)?);
        }
        send_option(s, OPT_SET_META_CONTEXT, &d).await?;
        let mut n = 0usize;
        loop {
            let r = read_reply(s, OPT_SET_META_CONTEXT).await?;
            match r.kind {
                REP_ACK => break,
                REP_META_CONTEXT => {
                    n += 1;
                    if n > MAX_META_REPLIES {
                        return Err(hs(HandshakeFault::TooManyReplies("meta context")));
                    }
                    if r.data.len() < 5 || r.data.len() > 4 + MAX_STRING {
                        return Err(hs(HandshakeFault::BadLength {
                            what: "meta context reply",
                            len: r.data.len(),
                        }));
                    }
                    let id = be32(&r.data[0..4]);
                    let name = String::from_utf8(r.data[4..].to_vec())
                        .map_err(|_| hs(HandshakeFault::ContextNameNotUtf8))?;
                    if meta_contexts.contains(&name) {
                        contexts.insert(name, id);
                    } else {
                        tracing::debug!(%name, id, "ignoring meta context we did not ask for");
                    }
                }
                k => {
                    return Err(hs(HandshakeFault::UnexpectedReply {
                        option: "set meta context",
                        reply: k,
                    }));
                }
            }
        }
    }

    // Go.
    let mut d = name_field(export)?;
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &d).await?;
    let mut export_info: Option<(u64, u16)> = None;
    let mut block_size = BlockSize::default();
    let mut n = 0usize;
    loop {
        n += 1;
        if n > MAX_INFO_REPLIES {
            return Err(hs(HandshakeFault::TooManyReplies("info")));
        }
        let r = read_reply(s, OPT_GO).await?;
        match r.kind {
            REP_ACK => break,
            REP_INFO => {
                if r.data.len() < 2 {
                    return Err(hs(HandshakeFault::InfoWithoutType));
                }
                match be16(&r.data[0..2]) {
                    INFO_EXPORT => {
                        if r.data.len() != 12 {
                            return Err(hs(HandshakeFault::BadLength {
                                what: "export info",
                                len: r.data.len(),
                            }));
                        }
                        export_info = Some((be64(&r.data[2..10]), be16(&r.data[10..12])));
                    }
                    INFO_BLOCK_SIZE => {
                        if r.data.len() != 14 {
                            return Err(hs(HandshakeFault::BadLength {
                                what: "block size info",
                                len: r.data.len(),
                            }));
                        }
                        block_size = BlockSize {
                            minimum: be32(&r.data[2..6]),
                            preferred: be32(&r.data[6..10]),
                            maximum: be32(&r.data[10..14]),
                        };
                        validate_block_size(&block_size)?;
                    }
                    _ => {} // names, descriptions, future info types: ignored
                }
            }
            k => {
                return Err(hs(HandshakeFault::UnexpectedReply {
                    option: "go",
                    reply: k,
                }));
            }
        }
    }
    let (size, flags) = export_info.ok_or_else(|| hs(HandshakeFault::NoExportInfo))?;
    if size > i64::MAX as u64 {
        return Err(hs(HandshakeFault::ExportTooLarge(size)));
    }
    Ok(ExportInfo {
        size,
        flags,
        block_size,
        structured,
        contexts,
    })
}

fn validate_block_size(b: &BlockSize) -> Result<(), NbdError> {
    let ok = b.minimum.is_power_of_two()
        && b.minimum <= 65536
        && b.preferred.is_power_of_two()
        && b.preferred >= b.minimum
        && b.maximum >= b.minimum;
    if ok {
        Ok(())
    } else {
        Err(hs(HandshakeFault::BadBlockSize {
            minimum: b.minimum,
            preferred: b.preferred,
            maximum: b.maximum,
        }))
    }
}
