//! A clone's life: create (validate, open and claim the bases, read or
//! format the metadata, build the shared state and one owner per reactor,
//! register the bdev), completion (release the source once every region is
//! hydrated and committed), quiesce for reset, and delete (stop the owners,
//! a final commit, drop them).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bdev::{stacked, Bdev, BdevBuilder, ClaimType, Desc, IoChannel, IoType};
use reactor::sync::lock;
use uuid::Uuid;

use crate::clone::{CloneBdev, Descs, Shared, MODULE_NAME, PRODUCT_NAME};
use crate::commit::CommitRounds;
use crate::committer::{answer, start_round};
use crate::error::CloneError;
use crate::geometry::Geometry;
use crate::hydration::PAUSE_NONE;
use crate::metadata::{self, SuperState, FORMAT_BLOCK_SIZE, UNIT_SIZE};
use crate::metadata_io::{
    format_metadata, open_metadata, read_superblock, repair_metadata, Opened,
};
use crate::owner::{drive, owner_of, start_owner, OWNERS};
use crate::region_map::{units_for, RegionMap};
use crate::router::{MetadataMode, Router, RouterConfig, Stripes};
use crate::rpc::{check_tunables, CreateOpts};

/// How long delete waits for in-flight work before giving up on it.
pub(crate) const STOP_TIMEOUT_NS: u64 = 10_000_000_000;

/// Check `done` every millisecond until it holds or `STOP_TIMEOUT_NS`
/// passed; whether it held.
async fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let t0 = reactor::now_ns();
    loop {
        if done() {
            return true;
        }
        if reactor::now_ns() - t0 > STOP_TIMEOUT_NS {
            return false;
        }
        reactor::sleep(Duration::from_millis(1)).await;
    }
}

/// Completion (every region hydrated and committed): from now on all I/O
/// goes straight to the destination; each owner drops its router once its
/// in-flight requests are done; then the source claim is released.
pub(crate) async fn release_all(sh: Arc<Shared>) {
    sh.released.store(true, Ordering::Release);
    sh.rate_bps.store(0, Ordering::Relaxed);
    if lock(&sh.descs).source.is_some() {
        tracing::info!(clone = %sh.name, "fully hydrated: releasing the source");
    }
    let id = sh.id;
    for &r in &sh.owners {
        reactor::run_on(r, move || async move {
            let Some(rc) = owner_of(id) else { return };
            wait_until(|| rc.borrow().router.as_ref().is_none_or(|r| r.is_idle())).await;
            rc.borrow_mut().release_local();
        })
        .await;
    }
    let d = lock(&sh.descs).source.take();
    drop(d);
}

/// Delete: every owner stops background work and lets its in-flight I/O
/// finish; the committer makes a final commit (a failure is logged, not
/// fatal: the bases may be gone); then the owners are dropped.
pub(crate) async fn stop_all(sh: &Arc<Shared>) {
    let id = sh.id;
    for &r in &sh.owners {
        reactor::run_on(r, move || async move {
            let Some(rc) = owner_of(id) else { return };
            rc.borrow_mut().stopping = true;
            let idle = wait_until(|| {
                drive(&rc);
                rc.borrow().router.as_ref().is_none_or(|r| r.is_idle())
            })
            .await;
            if !idle {
                tracing::warn!(clone = %rc.borrow().sh.name, "delete: in-flight I/O did not finish in time");
            }
        })
        .await;
    }
    reactor::run_on(sh.home, move || async move {
        let Some(rc) = owner_of(id) else { return };
        let mut started = false;
        let done = wait_until(|| {
            let (busy, dirty) = {
                let o = rc.borrow();
                let busy = o.committer.as_ref().is_some_and(|c| c.in_flight());
                (busy, o.sh.map.has_dirty() && o.sh.mode() == MetadataMode::ReadWrite)
            };
            if !busy && (started || !dirty) {
                return true;
            }
            if !busy && !started {
                started = true;
                start_round(&rc, true);
            }
            false
        })
        .await;
        if !done {
            tracing::warn!(clone = %rc.borrow().sh.name, "delete: the final commit did not finish in time");
        }
        if rc.borrow().sh.mode() != MetadataMode::ReadWrite {
            tracing::warn!(clone = %rc.borrow().sh.name, "final metadata commit not possible; recent hydration will be redone on resume");
        }
    })
    .await;
    for &r in &sh.owners {
        reactor::run_on(r, move || async move {
            let rc = OWNERS.with(|o| o.borrow_mut().remove(&id));
            if let Some(rc) = rc {
                let mut o = rc.borrow_mut();
                o.pollers.clear();
                o.router = None;
                // Commit waiters still queued get an answer.
                if let Some(c) = o.committer.take() {
                    drop(o);
                    for w in c.into_waiters() {
                        answer(id, w, false);
                    }
                }
            }
        })
        .await;
    }
}

/// Reset support: hold background copies back and wait for the owner to
/// drain (`on`), or let them go again.
pub(crate) async fn owner_quiesce(id: u64, on: bool) {
    let Some(rc) = owner_of(id) else { return };
    rc.borrow_mut().quiesced = on;
    if !on {
        drive(&rc);
        return;
    }
    wait_until(|| {
        drive(&rc);
        rc.borrow()
            .router
            .as_ref()
            .is_none_or(|r| r.stats().copies_in_flight == 0 && r.stats().ops_in_flight == 0)
    })
    .await;
}

/// Where a base's event callback finds the clone once registered.
pub(crate) type SelfRef = stacked::RemoveLink;

pub(crate) static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) static NEXT_OWNER: AtomicU32 = AtomicU32::new(0);

/// Bitmap words per ownership stripe; 0: automatic (stripes of >= 4 MiB).
pub(crate) static STRIPE_WORDS: AtomicU64 = AtomicU64::new(0);

/// Tests: stripes of `words` bitmap words (64 regions each) for clones
/// created from now on; 0 restores the automatic size.
#[doc(hidden)]
pub fn set_stripe_words(words: u64) {
    STRIPE_WORDS.store(words, Ordering::Relaxed);
}

pub(crate) fn stripe_words(region_size: u64) -> u64 {
    match STRIPE_WORDS.load(Ordering::Relaxed) {
        0 => (4u64 << 20).div_ceil(region_size * 64).max(1),
        w => w,
    }
}

/// Open and claim a base for the clone. The source's removal after
/// completion never arrives: its descriptor is closed by then.
fn open_claim(name: &str, ty: ClaimType) -> Result<(Desc, SelfRef), CloneError> {
    stacked::claim_base(name, ty, MODULE_NAME).map_err(CloneError::from_bdev)
}

/// Create a clone (reactor 0). On failure nothing is left: no claim, no
/// bdev, metadata untouched unless it was blank.
pub async fn create(opts: CreateOpts) -> Result<Arc<Bdev>, CloneError> {
    let source_present = check_create(&opts)?;
    let bases = open_bases(&opts, source_present)?;
    let md_ch = bases.md.0.channel();
    let state = read_superblock(&md_ch).await;
    let (geo, src_align) = clone_geometry(&opts, &bases, &state)?;
    let map = Arc::new(RegionMap::new(geo.num_regions()));
    let (uuid, formatted) = load_metadata(&opts, &bases, &md_ch, &geo, state, &map).await?;
    drop(md_ch);
    let (sh, routers, self_refs) = build_shared(&opts, bases, geo, map, uuid)?;
    start_owners(&sh, routers).await?;
    let bdev = register(&opts, &sh, src_align).await?;
    for me in self_refs {
        me.link(&bdev);
    }
    tracing::info!(
        clone = %opts.name,
        source = %sh.source_name,
        dest = %sh.dest_name,
        metadata = %sh.md_name,
        regions = geo.num_regions(),
        hydrated = sh.map.hydrated_count(),
        formatted,
        source_released = sh.released.load(Ordering::Relaxed),
        home = sh.home,
        stripe_regions = sh.stripes.regions,
        "clone bdev created"
    );
    Ok(bdev)
}

/// The three bases, opened and claimed (no source: a fully hydrated clone
/// restarted without it).
struct Bases {
    src: Option<(Desc, SelfRef)>,
    dst: (Desc, SelfRef),
    md: (Desc, SelfRef),
}

/// Create, step 1: the parameters and the bases' existence, before anything
/// is opened. Returns whether the source is present.
fn check_create(opts: &CreateOpts) -> Result<bool, CloneError> {
    if opts.name.is_empty() {
        return Err(CloneError::Invalid("clone name must not be empty".into()));
    }
    if bdev::get(&opts.name).is_some() {
        return Err(CloneError::Exists(opts.name.clone()));
    }
    check_tunables(
        Some(opts.hydration_batch_size),
        Some(opts.hydration_mbytes_per_sec),
    )?;
    if !opts.region_size_kb.is_power_of_two() || !(4..=1_048_576).contains(&opts.region_size_kb) {
        return Err(CloneError::Invalid(format!(
            "region_size_kb {} must be a power of two from 4 to 1048576",
            opts.region_size_kb
        )));
    }
    // The source may be missing only for a clone whose metadata says it
    // is fully hydrated (checked once the metadata is read).
    let source_present = bdev::get(&opts.source_bdev_name).is_some();
    for (what, n) in [
        ("destination", &opts.dest_bdev_name),
        ("metadata", &opts.metadata_bdev_name),
    ] {
        if bdev::get(n).is_none() {
            tracing::debug!(role = what, bdev = %n, "clone create: missing base bdev");
            return Err(CloneError::NoSuchBdev(n.clone()));
        }
    }
    if !source_present && opts.force_format {
        return Err(no_source(opts, "force_format needs the source".into()));
    }
    let names = [
        &opts.source_bdev_name,
        &opts.dest_bdev_name,
        &opts.metadata_bdev_name,
    ];
    if names[0] == names[1] || names[0] == names[2] || names[1] == names[2] {
        return Err(CloneError::Invalid(
            "source, destination and metadata must be three different bdevs".into(),
        ));
    }
    Ok(source_present)
}

fn no_source(opts: &CreateOpts, why: String) -> CloneError {
    CloneError::NoSource {
        name: opts.source_bdev_name.clone(),
        why,
    }
}

/// Create, step 2: open and claim the bases (the source shared for
/// reading, the others exclusively); the metadata's block size checked.
fn open_bases(opts: &CreateOpts, source_present: bool) -> Result<Bases, CloneError> {
    let src = if source_present {
        Some(open_claim(
            &opts.source_bdev_name,
            ClaimType::ReadManyWriteNone,
        )?)
    } else {
        None
    };
    let dst = open_claim(&opts.dest_bdev_name, ClaimType::ExclusiveWrite)?;
    let md = open_claim(&opts.metadata_bdev_name, ClaimType::ExclusiveWrite)?;
    let mdbs = md.0.bdev().block_size();
    if mdbs == 0
        || !mdbs.is_power_of_two()
        || mdbs as u64 > FORMAT_BLOCK_SIZE
        || (mdbs as usize) < UNIT_SIZE
    {
        return Err(CloneError::Invalid(format!(
            "metadata bdev block size {mdbs} is not supported (512 to 4096, a power of two)"
        )));
    }
    Ok(Bases { src, dst, md })
}

/// Create, step 3: the clone's geometry, from the source or, without it,
/// from the superblock; the metadata bdev large enough. Also returns the
/// source's required alignment.
fn clone_geometry(
    opts: &CreateOpts,
    bases: &Bases,
    state: &Result<SuperState, CloneError>,
) -> Result<(Geometry, u32), CloneError> {
    let (src_blocks, src_bs, src_align) = match &bases.src {
        Some((s, _)) => (
            s.bdev().num_blocks(),
            s.bdev().block_size(),
            s.bdev().required_alignment(),
        ),
        None => match state {
            Ok(SuperState::Valid { sb, .. }) if sb.flags & metadata::FLAG_FORMATTING == 0 => {
                (sb.source_blocks, sb.block_size, 0)
            }
            Ok(_) => return Err(no_source(opts, "the metadata holds no clone".into())),
            Err(e) => return Err(no_source(opts, format!("the metadata is unusable: {e}"))),
        },
    };
    let db = bases.dst.0.bdev();
    let geo = Geometry::new(
        src_blocks,
        src_bs,
        db.num_blocks(),
        db.block_size(),
        opts.region_size_kb as u64 * 1024,
    )?;
    metadata::check_size(bases.md.0.bdev().size_bytes(), geo.num_regions())?;
    check_map_memory(&geo)?;
    Ok((geo, src_align))
}

/// What a clone holds in memory at worst, against what the machine can
/// give (-ENOMEM): the region map, allocated zeroed (untouched pages cost
/// nothing) but growing to its full size as regions hydrate, and a commit
/// of every bitmap unit at once (a whole-device discard, as mkfs sends),
/// whose snapshot and write buffer each hold every unit. Refused here
/// rather than an abort on the allocation now or an OOM kill later, which
/// would take every other clone down too.
fn check_map_memory(geo: &Geometry) -> Result<(), CloneError> {
    let n = geo.num_regions();
    let units = units_for(n);
    let map = (n.div_ceil(64) + units.div_ceil(64)) * 8;
    let commit = 2 * units * UNIT_SIZE as u64;
    reactor::memory::check_available((map + commit) as usize).map_err(|e| {
        CloneError::NoMem(format!(
            "a clone of {n} regions (region map {map} bytes, a full metadata commit {commit} bytes): {e}"
        ))
    })
}

/// Create, step 4: open the metadata into `map` (refusing damage), check a
/// clone without its source is fully hydrated, then (every check passed)
/// format or repair. Returns the clone's uuid and whether it formatted.
async fn load_metadata(
    opts: &CreateOpts,
    bases: &Bases,
    md_ch: &IoChannel,
    geo: &Geometry,
    state: Result<SuperState, CloneError>,
    map: &RegionMap,
) -> Result<(Uuid, bool), CloneError> {
    let opened = open_metadata(md_ch, geo, state, opts.uuid, opts.force_format, map).await?;
    if bases.src.is_none() && !map.is_complete() {
        return Err(no_source(
            opts,
            format!(
                "the metadata shows {} of {} regions hydrated; only a fully hydrated clone runs without its source",
                map.hydrated_count(),
                geo.num_regions()
            ),
        ));
    }
    // Every check passed: from here on the metadata may be written.
    Ok(match opened {
        Opened::Format(uuid) => {
            if opts.force_format {
                tracing::warn!(clone = %opts.name, %uuid, "force_format: formatting the metadata; every region reads from the source again");
            }
            format_metadata(md_ch, geo, uuid, map).await?;
            (uuid, true)
        }
        Opened::Loaded { uuid, repair } => {
            if let Some(r) = repair {
                repair_metadata(md_ch, map, r, &opts.name).await?;
            }
            (uuid, false)
        }
    })
}

/// Create, step 5: the shared state and one router per reactor (striped
/// ownership, one committer's rounds). Returns the bases' self-references
/// to fill once the bdev is registered.
#[allow(clippy::type_complexity)]
fn build_shared(
    opts: &CreateOpts,
    bases: Bases,
    geo: Geometry,
    map: Arc<RegionMap>,
    uuid: Uuid,
) -> Result<(Arc<Shared>, Vec<Router>, Vec<SelfRef>), CloneError> {
    let Bases { src, dst, md } = bases;
    let (db, mb) = (dst.0.bdev().clone(), md.0.bdev().clone());
    let released = src.is_none();
    // The source's own name (not an alias); without it, the name given.
    let source_name = match &src {
        Some((d, _)) => d.bdev().name().to_string(),
        None => opts.source_bdev_name.clone(),
    };
    let (src, src_me) = match src {
        Some((d, me)) => (Some(d), Some(me)),
        None => (None, None),
    };
    let cfg = RouterConfig {
        hydration_threshold: opts.hydration_threshold as u64,
        hydration_batch_size: opts.hydration_batch_size.max(1) as u64,
        hydration_enabled: !opts.no_hydration,
        discard_passdown: !opts.no_discard_passdown,
        copy_on_read: opts.copy_on_read,
    };
    let n = reactor::num_reactors().max(1);
    // The committer's reactor rotates over clones.
    let home = NEXT_OWNER.fetch_add(1, Ordering::Relaxed) % n;
    let owners: Vec<u32> = (0..n).collect();
    let stripes = Stripes {
        regions: 64 * stripe_words(geo.region_size()),
        owners: owners.len() as u64,
    };
    let commit_rounds = CommitRounds::default();
    let mut routers = Vec::with_capacity(owners.len());
    for i in 0..owners.len() {
        let mut r = Router::new(
            geo,
            map.clone(),
            cfg.clone(),
            MetadataMode::ReadWrite,
            commit_rounds.clone(),
        )
        .map_err(|e| CloneError::Invalid(e.to_string()))?;
        r.set_stripe(stripes.regions, i as u64, stripes.owners);
        routers.push(r);
    }
    let sh = Arc::new(Shared {
        id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        name: opts.name.clone(),
        source_name,
        dest_name: db.name().to_string(),
        md_name: mb.name().to_string(),
        uuid,
        geo,
        map,
        home,
        hydrating: owners.iter().map(|_| AtomicU64::new(0)).collect(),
        pacing: owners.iter().map(|_| Default::default()).collect(),
        owners,
        stripes,
        commit_rounds,
        md_block_size: mb.block_size(),
        md_num_blocks: mb.num_blocks(),
        dest_write_zeroes: db.io_type_supported(IoType::WriteZeroes),
        dest_unmap: db.io_type_supported(IoType::Unmap),
        discard_passdown: !opts.no_discard_passdown,
        hydration_enabled: AtomicBool::new(!opts.no_hydration),
        paused: AtomicU8::new(PAUSE_NONE),
        threshold: AtomicU32::new(opts.hydration_threshold),
        batch: AtomicU32::new(opts.hydration_batch_size.max(1)),
        mbytes_per_sec: AtomicU64::new(opts.hydration_mbytes_per_sec),
        copy_on_read: AtomicBool::new(opts.copy_on_read),
        mode: AtomicU8::new(MetadataMode::ReadWrite.code()),
        err_source: AtomicU64::new(0),
        err_dest: AtomicU64::new(0),
        err_md: AtomicU64::new(0),
        hydrated_bytes: AtomicU64::new(0),
        rate_bps: AtomicU64::new(0),
        released: AtomicBool::new(released),
        last_error: Mutex::new(None),
        descs: Mutex::new(Descs {
            source: src,
            dest: Some(dst.0),
            md: Some(md.0),
        }),
        kick: AtomicBool::new(false),
    });
    let self_refs = src_me.into_iter().chain([dst.1, md.1]).collect();
    Ok((sh, routers, self_refs))
}

/// Create, step 6: an owner on each reactor, each with its router (undone
/// on failure).
async fn start_owners(sh: &Arc<Shared>, routers: Vec<Router>) -> Result<(), CloneError> {
    for (i, router) in routers.into_iter().enumerate() {
        let sh2 = sh.clone();
        let started = reactor::run_on(
            sh.owners[i],
            move || async move { start_owner(sh2, router, i) },
        )
        .await;
        if let Err(e) = started {
            undo_create(sh).await;
            return Err(e);
        }
    }
    Ok(())
}

/// Create, step 7: register the bdev (undone on failure).
async fn register(
    opts: &CreateOpts,
    sh: &Arc<Shared>,
    src_align: u32,
) -> Result<Arc<Bdev>, CloneError> {
    let (db_align, db_phys) = {
        let descs = lock(&sh.descs);
        let db = descs.dest.as_ref().map(|d| d.bdev().clone());
        (
            db.as_ref().map_or(0, |b| b.required_alignment()),
            db.as_ref().map_or(0, |b| b.physical_block_size()),
        )
    };
    let reg = BdevBuilder::new(opts.name.clone(), PRODUCT_NAME)
        .block_size(sh.geo.block_size())
        .num_blocks(sh.geo.source_blocks())
        .uuid(Some(sh.uuid))
        .write_cache(true)
        .required_alignment(db_align.max(src_align))
        .optimal_io_boundary(0)
        .physical_block_size(db_phys)
        .register(CloneBdev(sh.clone()));
    match reg {
        Ok(b) => Ok(b),
        Err(e) => {
            undo_create(sh).await;
            Err(CloneError::from_bdev(e))
        }
    }
}

/// A create that failed after its owners started: stop them, close the
/// bases.
async fn undo_create(sh: &Arc<Shared>) {
    stop_all(sh).await;
    drop(std::mem::take(&mut *lock(&sh.descs)));
}

/// Delete a clone (reactor 0): final commit, claims released.
pub async fn delete(name: &str) -> Result<(), CloneError> {
    bdev::unregister_by_name(name, MODULE_NAME)
        .await
        .map_err(|_| CloneError::NoSuchClone(name.to_string()))
}
