//! The commit protocol's executor: one committer per clone, on its home
//! reactor, serialises commit rounds for every owner. A round snapshots
//! the dirty bitmap units, flushes the destination, writes the units and
//! flushes the metadata bdev (in that order: a bit is durable only after
//! its data); routers' commits and user flushes wait for the next round
//! that started after they asked. A failed round switches the clone to
//! read-only (or failed) mode as dm-clone does.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bdev::{util, IoChannel, IoStatus, IoType};
use reactor::DmaBuf;

use crate::channel::{reply, send_to, Part};
use crate::clone::Shared;
use crate::commit::{self, UnitImage};
use crate::metadata::{self, UNIT_SIZE};
use crate::metadata_io::recheck_metadata;
use crate::owner::{drive, owner_of, then_drive, Owner};
use crate::router::CommitId;
use crate::router::MetadataMode;

/// Periodic commit.
pub(crate) const COMMIT_PERIOD: Duration = Duration::from_secs(1);

/// Who waits for a commit round.
pub(crate) enum Waiter {
    /// A router's `Commit` (its owner reactor and commit id).
    Router { reactor: u32, commit: CommitId },
    /// A user flush.
    Flush { origin: u32, token: u64 },
}

/// The clone's committer (on its home reactor's owner).
pub(crate) type Committer = commit::Committer<Waiter>;

/// On the home reactor: a commit is wanted by `w`.
pub(crate) fn committer_request(id: u64, w: Waiter) {
    let Some(rc) = owner_of(id) else {
        return answer(id, w, false);
    };
    let has = rc.borrow().committer.is_some();
    if !has {
        return answer(id, w, false);
    }
    if let Some(c) = rc.borrow_mut().committer.as_mut() {
        c.request(w);
    }
    start_round(&rc, false);
}

pub(crate) fn committer_flush(id: u64, origin: u32, token: u64) {
    committer_request(id, Waiter::Flush { origin, token });
}

pub(crate) fn answer(id: u64, w: Waiter, ok: bool) {
    match w {
        Waiter::Router { reactor, commit } => send_to(reactor, move || {
            let Some(rc) = owner_of(id) else { return };
            then_drive(&Rc::downgrade(&rc), move |o| o.commit_done(commit, ok));
        }),
        Waiter::Flush { origin, token } => {
            let st = if ok {
                IoStatus::Success
            } else {
                IoStatus::Failed
            };
            reply(origin, Part { token, offset: 0 }, st, None)
        }
    }
}

/// Start a commit round if none is in flight and one is wanted (waiters,
/// or `periodic` with dirty units).
pub(crate) fn start_round(rc: &Rc<RefCell<Owner>>, periodic: bool) {
    let mut o = rc.borrow_mut();
    let sh = o.sh.clone();
    let (dst, md) = (o.dst.clone(), o.md.clone());
    let units_per_block = metadata::units_per_block(sh.md_block_size);
    let Some(c) = o.committer.as_mut() else {
        return;
    };
    let Some(round) = c.start(&sh.map, periodic) else {
        return;
    };
    drop(o);
    let weak = Rc::downgrade(rc);
    reactor::spawn_local(async move {
        let ok = if round.dirty.is_empty() {
            // Nothing changed: a destination flush, no metadata write.
            let ok = util::simple(&dst, IoType::Flush, 0, sh.geo.source_blocks())
                .await
                .is_ok();
            if !ok {
                sh.err_dest.fetch_add(1, Ordering::Relaxed);
            }
            ok
        } else if sh.mode() != MetadataMode::ReadWrite {
            false
        } else {
            let units = commit::snapshot_units(&sh.map, &round.dirty, units_per_block);
            commit_units(&dst, &md, &sh, units).await
        };
        if !ok && !round.dirty.is_empty() {
            // The committer puts the units back in the dirty set: every
            // later flush needing them fails (dm-clone read-only mode).
            if sh.worsen_mode(MetadataMode::ReadOnly) == MetadataMode::ReadWrite {
                tracing::error!(clone = %sh.name, "metadata commit failed: switching to read-only mode");
                // dm-clone's abort: reopen the last committed metadata; if
                // even that fails the metadata is unusable and the clone
                // goes to fail mode (every I/O fails; never left again).
                if let Err(why) = recheck_metadata(&md, &sh).await {
                    sh.worsen_mode(MetadataMode::Failed);
                    sh.set_last_error(format!("metadata unusable after a failed commit: {why}"));
                    tracing::error!(clone = %sh.name, %why, "metadata unusable: switching to fail mode");
                }
            }
        }
        let Some(rc) = weak.upgrade() else { return };
        let waiters = {
            let mut o = rc.borrow_mut();
            let Some(c) = o.committer.as_mut() else {
                return;
            };
            c.finish(&sh.map, round, ok)
        };
        for w in waiters {
            answer(sh.id, w, ok);
        }
        start_round(&rc, false);
        drive(&rc);
    });
}

/// The commit's three steps, strictly in order: flush the destination,
/// write the units (whole metadata blocks), flush the metadata bdev.
pub(crate) async fn commit_units(
    dst: &IoChannel,
    md: &IoChannel,
    sh: &Shared,
    units: Vec<UnitImage>,
) -> bool {
    if util::simple(dst, IoType::Flush, 0, sh.geo.source_blocks())
        .await
        .is_err()
    {
        sh.err_dest.fetch_add(1, Ordering::Relaxed);
        sh.set_last_error("destination flush before a metadata commit failed".into());
        return false;
    }
    let mdbs = sh.md_block_size as usize;
    let per = (mdbs / UNIT_SIZE).max(1);
    // Runs of consecutive units, each written as one I/O.
    let mut i = 0;
    while i < units.len() {
        let mut j = i + 1;
        while j < units.len() && units[j].index == units[j - 1].index + 1 {
            j += 1;
        }
        let first = units[i].index as u64;
        let count = (j - i).div_ceil(per) * per;
        let mut buf = DmaBuf::zeroed(count * UNIT_SIZE);
        for (k, u) in units[i..j].iter().enumerate() {
            let img = metadata::encode_unit_words(&sh.uuid, u.index, &u.words);
            buf.as_mut_slice()[k * UNIT_SIZE..(k + 1) * UNIT_SIZE].copy_from_slice(&img);
        }
        let off = metadata::unit_offset(first) / mdbs as u64;
        if util::write(md, off, buf, false).await.is_err() {
            sh.err_md.fetch_add(1, Ordering::Relaxed);
            sh.set_last_error(format!("metadata write of units {first}.. failed"));
            return false;
        }
        i = j;
    }
    if util::simple(md, IoType::Flush, 0, sh.md_num_blocks)
        .await
        .is_err()
    {
        sh.err_md.fetch_add(1, Ordering::Relaxed);
        sh.set_last_error("metadata flush failed".into());
        return false;
    }
    true
}
