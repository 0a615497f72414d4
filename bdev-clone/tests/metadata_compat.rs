//! Metadata written by version 1 (the format before issue 8) keeps
//! opening and is upgraded in place; `force_format` is the operator's way
//! out of damaged metadata; an interrupted format is formatted again.

use bdev::util::run_on_reactor;
use bdev_clone::metadata::{self, SuperState, Superblock, UnitKey, UNIT_SIZE, VERSION, VERSION_1};
use bdev_clone::region_map::WORDS_PER_UNIT;
use bdev_clone::{create, delete, CreateOpts, Geometry};
use uuid::Uuid;

mod bases;
use bases::{mk_malloc, pattern, read_all, write_all};

const BS: u64 = 512;
/// 4 MiB of 512-byte blocks, 4 KiB regions: 1024 regions, one unit.
const BLOCKS: u64 = 8192;
const REGION_BLOCKS: u64 = 8;

fn geo() -> Geometry {
    Geometry::new(BLOCKS, BS as u32, BLOCKS, BS as u32, REGION_BLOCKS * BS).unwrap()
}

/// What the version 1 code wrote for a clone with `hydrated` regions: the
/// superblock in slot 0 only (slot 1 zero), units with the plain crc, a
/// unit with no hydrated region never written (all zero).
fn v1_image(uuid: Uuid, hydrated: &[u64], md_bytes: usize) -> Vec<u8> {
    let g = geo();
    let mut md = vec![0u8; md_bytes];
    let mut sb = Superblock::new(uuid, &g);
    sb.version = VERSION_1;
    md[..4096].copy_from_slice(&metadata::encode_superblock(&sb, 0));
    let mut words = [0u64; WORDS_PER_UNIT];
    for &r in hydrated {
        words[(r / 64) as usize] |= 1 << (r % 64);
    }
    if !hydrated.is_empty() {
        let off = metadata::unit_offset(0) as usize;
        md[off..off + UNIT_SIZE].copy_from_slice(&metadata::encode_unit_words_v1(0, &words));
    }
    md
}

/// Source, destination (hydrated regions hold `dst_seed` data) and
/// metadata `md` (blocks of `md_bs`); returns what the clone must read.
async fn stack(p: &str, md_bs: u32, md: &[u8], hydrated: &[u64]) -> Vec<u8> {
    let src = pattern((BLOCKS * BS) as usize, 1);
    let dst = pattern((BLOCKS * BS) as usize, 2);
    mk_malloc(&format!("{p}S"), BS as u32, BLOCKS);
    mk_malloc(&format!("{p}D"), BS as u32, BLOCKS);
    mk_malloc(&format!("{p}M"), md_bs, md.len() as u64 / md_bs as u64);
    write_all(&format!("{p}S"), 0, &src).await;
    write_all(&format!("{p}D"), 0, &dst).await;
    write_all(&format!("{p}M"), 0, md).await;
    let mut expect = src;
    let rb = (REGION_BLOCKS * BS) as usize;
    for &r in hydrated {
        let at = r as usize * rb;
        expect[at..at + rb].copy_from_slice(&dst[at..at + rb]);
    }
    expect
}

fn opts(p: &str) -> CreateOpts {
    let mut o = CreateOpts::new(
        format!("{p}C"),
        format!("{p}S"),
        format!("{p}D"),
        format!("{p}M"),
    );
    o.no_hydration = true;
    o
}

fn decode(md: &[u8]) -> SuperState {
    metadata::decode_superblock(&md[..4096], &md[4096..8192]).unwrap()
}

#[test]
fn version_1_metadata_opens_and_is_upgraded_in_place() {
    run_on_reactor(0x1, || async {
        let uuid = Uuid::from_u128(0x0001_0001);
        let hydrated = [0u64, 5, 6, 700, 1023];
        for md_bs in [512u32, 4096] {
            let p = format!("v{md_bs}");
            let md = v1_image(uuid, &hydrated, 64 << 10);
            let expect = stack(&p, md_bs, &md, &hydrated).await;
            // As a saved config (with its uuid) and as a re-create without.
            for with_uuid in [true, false] {
                let mut o = opts(&p);
                if with_uuid {
                    o.uuid = Some(uuid);
                }
                let c = create(o).await.unwrap();
                assert_eq!(c.uuid(), uuid);
                drop(c);
                assert_eq!(bdev_clone::hydrated_regions(&format!("{p}C")).unwrap().0, 5);
                assert_eq!(read_all(&format!("{p}C"), 0, BLOCKS).await, expect);
                delete(&format!("{p}C")).await.unwrap();
                // Now version 2, in both slots, every unit bound to the uuid.
                let now = read_all(&format!("{p}M"), 0, (64 << 10) / md_bs as u64).await;
                let SuperState::Valid { sb, both, .. } = decode(&now) else {
                    panic!("blank after upgrade")
                };
                assert_eq!((sb.version, sb.uuid, both), (VERSION, uuid, true));
                let key = UnitKey::of(&sb);
                let off = metadata::unit_offset(0) as usize;
                let words = metadata::decode_unit(&now[off..off + UNIT_SIZE], 0, &key).unwrap();
                assert_eq!(words[0], 0b110_0001);
            }
            // Upgraded: one zeroed superblock block no longer matters.
            write_all(&format!("{p}M"), 0, &[0u8; 4096]).await;
            create(opts(&p)).await.unwrap();
            assert_eq!(read_all(&format!("{p}C"), 0, BLOCKS).await, expect);
            delete(&format!("{p}C")).await.unwrap();
        }
    });
}

/// A version 1 clone with no hydrated region (no unit ever written) and
/// one whose upgrade was interrupted (units rewritten, superblock not yet).
#[test]
fn version_1_edge_cases() {
    run_on_reactor(0x1, || async {
        let uuid = Uuid::from_u128(0x0001_0002);
        let md = v1_image(uuid, &[], 64 << 10);
        let expect = stack("e", 512, &md, &[]).await;
        create(opts("e")).await.unwrap();
        assert_eq!(read_all("eC", 0, BLOCKS).await, expect);
        delete("eC").await.unwrap();

        let hydrated = [3u64, 4];
        let mut md = v1_image(uuid, &hydrated, 64 << 10);
        let mut words = [0u64; WORDS_PER_UNIT];
        words[0] = 0b11000;
        let off = metadata::unit_offset(0) as usize;
        md[off..off + UNIT_SIZE].copy_from_slice(&metadata::encode_unit_words(&uuid, 0, &words));
        let expect = stack("i", 512, &md, &hydrated).await;
        create(opts("i")).await.unwrap();
        assert_eq!(read_all("iC", 0, BLOCKS).await, expect);
        delete("iC").await.unwrap();

        // A version 1 clone that lost its superblock block: refused (there
        // was never a second copy), naming what the units still hold.
        let md = v1_image(uuid, &hydrated, 64 << 10);
        stack("l", 512, &md, &hydrated).await;
        write_all("lM", 0, &[0u8; 4096]).await;
        let e = create(opts("l")).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("1 bitmap units hold hydrated regions"),
            "{e}"
        );
    });
}

/// `force_format` formats damaged metadata (every region from the source
/// again), and is never saved; an interrupted format is simply redone.
#[test]
fn force_format_and_interrupted_format() {
    run_on_reactor(0x1, || async {
        let uuid = Uuid::from_u128(0x0001_0003);
        let hydrated = [1u64, 2];
        let md = v1_image(uuid, &hydrated, 64 << 10);
        stack("f", 4096, &md, &hydrated).await;
        // Damage: the only unit zeroed (after an upgrade, so it counts).
        create(opts("f")).await.unwrap();
        delete("fC").await.unwrap();
        write_all("fM", 2, &[0u8; 4096]).await;
        let e = create(opts("f")).await.unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.to_string().contains("unit 0: all zero"), "{e}");
        let mut o = opts("f");
        o.force_format = true;
        let c = create(o).await.unwrap();
        assert_ne!(
            c.uuid(),
            uuid,
            "force_format without a uuid picks a new one"
        );
        let cfg = c.ops().write_config_json(&c).unwrap();
        assert!(cfg["params"].get("force_format").is_none(), "{cfg}");
        drop(c);
        assert_eq!(bdev_clone::hydrated_regions("fC").unwrap().0, 0);
        assert_eq!(
            read_all("fC", 0, BLOCKS).await,
            pattern((BLOCKS * BS) as usize, 1),
            "after force_format every region reads from the source"
        );
        delete("fC").await.unwrap();

        // A superblock that says "formatting" (a crash during format).
        let g = geo();
        let mut sb = Superblock::new(uuid, &g);
        sb.flags = metadata::FLAG_FORMATTING;
        let mut md = vec![0u8; 64 << 10];
        md[..4096].copy_from_slice(&metadata::encode_superblock(&sb, 0));
        // Half of the units written.
        md[8192..8192 + 100].fill(0x5a);
        stack("g", 512, &md, &[]).await;
        let c = create(opts("g")).await.unwrap();
        assert_eq!(c.uuid(), uuid);
        drop(c);
        delete("gC").await.unwrap();
        let now = read_all("gM", 0, 128).await;
        let SuperState::Valid { sb, both, .. } = decode(&now) else {
            panic!()
        };
        assert_eq!((sb.flags, both), (0, true));
    });
}
