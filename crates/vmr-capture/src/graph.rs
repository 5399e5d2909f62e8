//! Reading QEMU's block graph state (nodes with their dirty bitmaps, jobs, exports) from QMP
//! query replies, and deciding from it whether incremental tracking is intact.
//!
//! Replies are read as JSON values, not through the `qapi-qmp` 9.1 types, so that fields or enum
//! values added by newer QEMU versions never break the parse.

use serde_json::Value;

use crate::names::Names;
use crate::{CaptureError, ResyncReason, Tracking};

/// One dirty bitmap of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BitmapInfo {
    pub name: String,
    pub recording: bool,
    pub busy: bool,
    pub persistent: bool,
    pub inconsistent: bool,
    pub count: u64,
}

/// One named block node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeInfo {
    pub name: String,
    pub drv: String,
    pub size: u64,
    pub bitmaps: Vec<BitmapInfo>,
}

impl NodeInfo {
    /// Whether bitmaps of this node can be stored in the image (survive a clean restart).
    pub fn persistent_capable(&self) -> bool {
        self.drv == "qcow2"
    }
}

fn unexpected(what: &'static str, v: &Value) -> CaptureError {
    CaptureError::BadQmpReply {
        what,
        reply: v.clone(),
    }
}

/// Parse `query-named-block-nodes` (flat).
pub(crate) fn parse_nodes(v: &Value) -> Result<Vec<NodeInfo>, CaptureError> {
    let arr = v
        .as_array()
        .ok_or_else(|| unexpected("query-named-block-nodes reply is not a list", v))?;
    let mut out = Vec::with_capacity(arr.len());
    for n in arr {
        let Some(name) = n.get("node-name").and_then(Value::as_str) else {
            continue;
        };
        let drv = n
            .get("drv")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let size = n
            .pointer("/image/virtual-size")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let mut bitmaps = Vec::new();
        if let Some(bs) = n.get("dirty-bitmaps").and_then(Value::as_array) {
            for b in bs {
                let flag = |k: &str| b.get(k).and_then(Value::as_bool).unwrap_or(false);
                let Some(bname) = b.get("name").and_then(Value::as_str) else {
                    continue;
                };
                bitmaps.push(BitmapInfo {
                    name: bname.to_owned(),
                    recording: flag("recording"),
                    busy: flag("busy"),
                    persistent: flag("persistent"),
                    inconsistent: flag("inconsistent"),
                    count: b.get("count").and_then(Value::as_u64).unwrap_or(0),
                });
            }
        }
        out.push(NodeInfo {
            name: name.to_owned(),
            drv,
            size,
            bitmaps,
        });
    }
    Ok(out)
}

/// `(id, status)` of each job in `query-block-jobs`.
pub(crate) fn parse_jobs(v: &Value) -> Result<Vec<(String, String)>, CaptureError> {
    let arr = v
        .as_array()
        .ok_or_else(|| unexpected("query-block-jobs reply is not a list", v))?;
    Ok(arr
        .iter()
        .filter_map(|j| {
            let id = j.get("device").and_then(Value::as_str)?;
            let st = j.get("status").and_then(Value::as_str).unwrap_or("");
            Some((id.to_owned(), st.to_owned()))
        })
        .collect())
}

/// Export ids in `query-block-exports`.
pub(crate) fn parse_exports(v: &Value) -> Result<Vec<String>, CaptureError> {
    let arr = v
        .as_array()
        .ok_or_else(|| unexpected("query-block-exports reply is not a list", v))?;
    Ok(arr
        .iter()
        .filter_map(|e| e.get("id").and_then(Value::as_str).map(str::to_owned))
        .collect())
}

/// Tracking bitmaps (with generations) of one node, ascending by generation.
pub(crate) fn tracking_bitmaps<'a>(
    names: &Names,
    node: &'a NodeInfo,
) -> Vec<(u64, &'a BitmapInfo)> {
    let mut v: Vec<(u64, &BitmapInfo)> = node
        .bitmaps
        .iter()
        .filter_map(|b| names.bitmap_generation(&b.name).map(|g| (g, b)))
        .collect();
    v.sort_by_key(|(g, _)| *g);
    v
}

/// Decide the tracking state of `disks` (in configuration order). `expected_sizes` are the
/// sizes at the last committed cycle; `Some` also means "replication was running", so that a
/// disk without any bitmap is reported as lost rather than not started.
pub(crate) fn analyse(
    names: &Names,
    disks: &[NodeInfo],
    expected_sizes: Option<&[u64]>,
) -> Tracking {
    for d in disks {
        let owned = d.bitmaps.iter().filter(|b| names.owns(&b.name));
        if owned.clone().any(|b| b.inconsistent) {
            return Tracking::Lost(ResyncReason::BitmapInconsistent {
                disk: d.name.clone(),
            });
        }
    }
    if let Some(exp) = expected_sizes {
        for (d, &was) in disks.iter().zip(exp) {
            // A grown disk keeps its tracking (QEMU grows the bitmaps with the disk; the new
            // area reads as zeros, which is what the replica's larger layer shows); only a
            // shrink loses it.
            if d.size < was {
                return Tracking::Lost(ResyncReason::DiskSizeChanged {
                    disk: d.name.clone(),
                    was,
                    now: d.size,
                });
            }
        }
    }
    if let Some(d) = disks
        .iter()
        .find(|d| d.bitmaps.iter().any(|b| names.is_full_marker(&b.name)))
    {
        return Tracking::Lost(ResyncReason::InitialCopyIncomplete {
            disk: d.name.clone(),
        });
    }
    let missing = |d: &NodeInfo| {
        if d.persistent_capable() {
            ResyncReason::BitmapMissing {
                disk: d.name.clone(),
            }
        } else {
            ResyncReason::RawDiskRestarted {
                disk: d.name.clone(),
            }
        }
    };
    let actives: Vec<Option<(u64, &BitmapInfo)>> = disks
        .iter()
        .map(|d| tracking_bitmaps(names, d).last().copied())
        .collect();
    if actives.iter().all(Option::is_none) {
        return match (expected_sizes, disks.first()) {
            (Some(_), Some(d)) => Tracking::Lost(missing(d)),
            _ => Tracking::NotStarted,
        };
    }
    let generation = actives.iter().flatten().map(|(g, _)| *g).max().unwrap_or(0);
    for (d, a) in disks.iter().zip(&actives) {
        match a {
            None => return Tracking::Lost(missing(d)),
            Some((g, _)) if *g != generation => {
                return Tracking::Lost(ResyncReason::BitmapMissing {
                    disk: d.name.clone(),
                });
            }
            Some((_, b)) if !b.recording => {
                return Tracking::Lost(ResyncReason::BitmapInconsistent {
                    disk: d.name.clone(),
                });
            }
            Some(_) => {}
        }
    }
    Tracking::Active { generation }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bm(name: &str, recording: bool, inconsistent: bool) -> BitmapInfo {
        BitmapInfo {
            name: name.into(),
            recording,
            busy: false,
            persistent: true,
            inconsistent,
            count: 0,
        }
    }

    fn node(name: &str, drv: &str, bitmaps: Vec<BitmapInfo>) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            drv: drv.into(),
            size: 100,
            bitmaps,
        }
    }

    #[test]
    fn parses_qemu_replies() {
        let v = json!([{"node-name": "disk0", "drv": "qcow2", "image": {"virtual-size": 1048576},
            "dirty-bitmaps": [{"name": "vmr-t-2", "recording": true, "busy": false, "persistent": true,
            "count": 65536, "granularity": 65536}], "newfield": {"x": 1}},
            {"drv": "file"}, {"node-name": "f", "drv": "file", "image": {"virtual-size": 5}}]);
        let n = parse_nodes(&v).expect("parse");
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].size, 1048576);
        assert_eq!(n[0].bitmaps[0].count, 65536);
        assert!(!n[0].bitmaps[0].inconsistent);
        assert!(parse_nodes(&json!({})).is_err());
        let j = parse_jobs(&json!([{"device": "j", "status": "running", "type": "backup"}]))
            .expect("jobs");
        assert_eq!(j, vec![("j".to_owned(), "running".to_owned())]);
        assert_eq!(
            parse_exports(&json!([{"id": "e", "node-name": "n"}])).expect("exp"),
            vec!["e".to_owned()]
        );
    }

    #[test]
    fn analysis_covers_every_state() {
        let n = Names::new("t").expect("tag");
        let ok = |g: u64| {
            node(
                "d0",
                "qcow2",
                vec![bm(&n.bitmap(g), true, false), bm("other", true, false)],
            )
        };
        assert_eq!(
            analyse(&n, &[node("d0", "qcow2", vec![])], None),
            Tracking::NotStarted
        );
        assert!(matches!(
            analyse(&n, &[node("d0", "qcow2", vec![])], Some(&[100])),
            Tracking::Lost(ResyncReason::BitmapMissing { .. })
        ));
        assert!(matches!(
            analyse(&n, &[node("d0", "raw", vec![])], Some(&[100])),
            Tracking::Lost(ResyncReason::RawDiskRestarted { .. })
        ));
        assert_eq!(
            analyse(&n, &[ok(3), ok(3)], Some(&[100, 100])),
            Tracking::Active { generation: 3 }
        );
        assert!(matches!(
            analyse(&n, &[ok(3)], Some(&[101])),
            Tracking::Lost(ResyncReason::DiskSizeChanged {
                was: 101,
                now: 100,
                ..
            })
        ));
        // Grown: tracking goes on.
        assert_eq!(
            analyse(&n, &[ok(3)], Some(&[99])),
            Tracking::Active { generation: 3 }
        );
        assert!(matches!(
            analyse(&n, &[ok(3), node("d1", "raw", vec![])], None),
            Tracking::Lost(ResyncReason::RawDiskRestarted { .. })
        ));
        assert!(matches!(
            analyse(&n, &[ok(3), ok(2)], None),
            Tracking::Lost(ResyncReason::BitmapMissing { .. })
        ));
        let inc = node("d0", "qcow2", vec![bm(&n.bitmap(1), false, true)]);
        assert!(matches!(
            analyse(&n, &[inc], None),
            Tracking::Lost(ResyncReason::BitmapInconsistent { .. })
        ));
        let stopped = node("d0", "qcow2", vec![bm(&n.bitmap(1), false, false)]);
        assert!(matches!(
            analyse(&n, &[stopped], None),
            Tracking::Lost(ResyncReason::BitmapInconsistent { .. })
        ));
        let full = node(
            "d0",
            "qcow2",
            vec![
                bm(&n.bitmap(1), true, false),
                bm(&n.full_marker(1), false, false),
            ],
        );
        assert!(matches!(
            analyse(&n, &[full], None),
            Tracking::Lost(ResyncReason::InitialCopyIncomplete { .. })
        ));
        // another VM's bitmaps are ignored
        let foreign = node("d0", "qcow2", vec![bm("vmr-x-5", false, true)]);
        assert_eq!(analyse(&n, &[foreign], None), Tracking::NotStarted);
    }
}
