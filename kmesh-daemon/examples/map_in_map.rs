//! Map-in-map update cost on this kernel, against the flat slot layout the
//! dataplane uses. Run as root:
//!
//! ```sh
//! cargo run --release -p kmesh-daemon --example map_in_map -- [updates] [slots-per-service]
//! ```
//!
//! A service's endpoint change, in each layout, make-before-break:
//! - **map-in-map** (`HASH_OF_MAPS` service id → `ARRAY` of slots): create
//!   and fill a fresh inner array, switch the outer entry to it (one
//!   update), close the old inner map. Measured: inner create + fill, outer
//!   insert (new key), outer replace (existing key), outer delete, and
//!   `BPF_MAP_UPDATE_BATCH` of outer entries.
//! - **flat slots** (what `KM_SLOT`/`KM_SERVICE` are): write the new slots
//!   into a `HASH` keyed by (service id, slot), switch the service entry,
//!   delete the old slots.
//!
//! Raw `bpf(2)` calls; the maps are created here, used by no program, and
//! closed at exit.

use std::time::{Duration, Instant};

const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_MAP_UPDATE_BATCH: u32 = 26;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_HASH_OF_MAPS: u32 = 13;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// `union bpf_attr` for BPF_MAP_CREATE (the leading fields; the kernel
/// zero-fills the rest of the union up to its own size).
#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
}

/// `union bpf_attr` for BPF_MAP_*_ELEM.
#[repr(C)]
#[derive(Default)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for BPF_MAP_*_BATCH.
#[repr(C)]
#[derive(Default)]
struct MapBatch {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<T>(cmd: u32, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a live, initialised #[repr(C)] prefix of `union
    // bpf_attr` for `cmd`, and its size is passed; the pointers inside it
    // (keys, values) point to live buffers of the sizes the map was
    // created with, owned by the caller for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_long,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the fd was returned by BPF_MAP_CREATE and is owned here.
        unsafe {
            libc::close(self.0);
        }
    }
}

fn create(map_type: u32, key_size: u32, value_size: u32, max: u32, inner: Option<&Fd>) -> Fd {
    let mut a = MapCreate {
        map_type,
        key_size,
        value_size,
        max_entries: max,
        map_flags: 0,
        inner_map_fd: inner.map_or(0, |f| f.0 as u32),
    };
    let fd = bpf(BPF_MAP_CREATE, &mut a).expect("BPF_MAP_CREATE (run as root)");
    Fd(fd as i32)
}

fn update<K, V>(map: &Fd, key: &K, value: &V, flags: u64) -> std::io::Result<()> {
    let mut a = MapElem {
        map_fd: map.0 as u32,
        key: key as *const K as u64,
        value: value as *const V as u64,
        flags,
        ..Default::default()
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(|_| ())
}

fn delete<K>(map: &Fd, key: &K) -> std::io::Result<()> {
    let mut a = MapElem {
        map_fd: map.0 as u32,
        key: key as *const K as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut a).map(|_| ())
}

type Slot = kmesh_abi::SockAddr;

fn slot(i: u32) -> Slot {
    let ip = std::net::Ipv4Addr::from(0x0a00_0000 | (i & 0xff_ffff));
    xds_adapter::addr::to_abi(std::net::SocketAddr::new(ip.into(), 8080))
}

/// An inner array of `n` slots, filled.
fn inner(n: u32) -> Fd {
    let m = create(
        BPF_MAP_TYPE_ARRAY,
        4,
        std::mem::size_of::<Slot>() as u32,
        n,
        None,
    );
    for i in 0..n {
        update(&m, &i, &slot(i), BPF_ANY).expect("inner fill");
    }
    m
}

struct Stats(Vec<Duration>);

impl Stats {
    fn line(&mut self, what: &str) {
        self.0.sort();
        let p = |q: f64| self.0[((self.0.len() - 1) as f64 * q).round() as usize];
        println!(
            "| {what} | {:.1} | {:.1} | {:.1} |",
            p(0.5).as_secs_f64() * 1e6,
            p(0.99).as_secs_f64() * 1e6,
            p(1.0).as_secs_f64() * 1e6
        );
    }
}

fn time(n: usize, mut f: impl FnMut(usize)) -> Stats {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i);
        v.push(t.elapsed());
    }
    Stats(v)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric arguments"))
        .collect();
    let n = args.first().copied().unwrap_or(200);
    let slots = args.get(1).copied().unwrap_or(8) as u32;
    println!("{n} operations each, {slots} slots per service; µs per operation");
    println!();
    println!("| operation | p50 µs | p99 µs | max µs |");
    println!("|---|---|---|---|");

    // Map-in-map.
    let template = inner(slots);
    let outer = create(BPF_MAP_TYPE_HASH_OF_MAPS, 4, 4, 65_536, Some(&template));
    time(n, |_| drop(inner(slots))).line(&format!(
        "map-in-map: create + fill an inner ARRAY of {slots} slots"
    ));
    let inners: Vec<Fd> = (0..n).map(|_| inner(slots)).collect();
    time(n, |i| {
        update(&outer, &(i as u32), &inners[i].0, BPF_NOEXIST).expect("outer insert")
    })
    .line("map-in-map: outer insert (new service id)");
    let spare: Vec<Fd> = (0..n).map(|_| inner(slots)).collect();
    time(n, |i| {
        update(&outer, &(i as u32), &spare[i].0, BPF_EXIST).expect("outer replace")
    })
    .line("map-in-map: outer replace (switch a service to a new inner map)");
    time(n, |i| delete(&outer, &(i as u32)).expect("outer delete"))
        .line("map-in-map: outer delete");
    // One endpoint change, end to end: new inner map, switch, old one closed.
    let mut current: Vec<Fd> = (0..n).map(|_| inner(slots)).collect();
    for (i, f) in current.iter().enumerate() {
        update(&outer, &(i as u32), &f.0, BPF_NOEXIST).expect("outer insert");
    }
    time(n, |i| {
        let fresh = inner(slots);
        update(&outer, &(i as u32), &fresh.0, BPF_EXIST).expect("outer replace");
        current[i] = fresh;
    })
    .line("map-in-map: one service's endpoints changed (create + fill + switch + close)");
    for i in 0..n {
        delete(&outer, &(i as u32)).expect("outer delete");
    }

    // Batch insert of outer entries.
    let keys: Vec<u32> = (0..n as u32).collect();
    let fds: Vec<u32> = inners.iter().map(|f| f.0 as u32).collect();
    let mut b = MapBatch {
        keys: keys.as_ptr() as u64,
        values: fds.as_ptr() as u64,
        count: n as u32,
        map_fd: outer.0 as u32,
        ..Default::default()
    };
    let t = Instant::now();
    match bpf(BPF_MAP_UPDATE_BATCH, &mut b) {
        Ok(_) => println!(
            "| map-in-map: BPF_MAP_UPDATE_BATCH of {n} outer entries, per entry | {:.1} | | |",
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        ),
        Err(e) => {
            println!("| map-in-map: BPF_MAP_UPDATE_BATCH of outer entries | refused: {e} | | |")
        }
    }

    // Flat slots, as KM_SLOT / KM_SERVICE.
    #[repr(C)]
    struct SlotKey {
        service: u32,
        slot: u32,
    }
    let slot_map = create(
        BPF_MAP_TYPE_HASH,
        8,
        std::mem::size_of::<Slot>() as u32,
        262_144,
        None,
    );
    let svc_map = create(
        BPF_MAP_TYPE_HASH,
        std::mem::size_of::<Slot>() as u32,
        std::mem::size_of::<kmesh_abi::ServiceValue>() as u32,
        65_536,
        None,
    );
    time(n, |i| {
        let key = SlotKey {
            service: i as u32,
            slot: 0,
        };
        update(&slot_map, &key, &slot(1), BPF_ANY).expect("slot write")
    })
    .line("flat: one slot write (HASH)");
    time(n, |i| {
        let v = kmesh_abi::ServiceValue {
            service_id: i as u32,
            slot_count: slots,
            lb_policy: 0,
            flags: 0,
            ..Default::default()
        };
        update(&svc_map, &slot(i as u32), &v, BPF_ANY).expect("service switch")
    })
    .line("flat: one service entry switch (HASH)");
    let mut id = n as u32;
    time(n, |i| {
        // New slots under a fresh id, switch, delete the old slots.
        let old = if i == 0 { None } else { Some(id - 1) };
        for s in 0..slots {
            let key = SlotKey {
                service: id,
                slot: s,
            };
            update(&slot_map, &key, &slot(s), BPF_ANY).expect("slot write");
        }
        let v = kmesh_abi::ServiceValue {
            service_id: id,
            slot_count: slots,
            lb_policy: 0,
            flags: 0,
            ..Default::default()
        };
        update(&svc_map, &slot(0), &v, BPF_ANY).expect("switch");
        if let Some(old) = old {
            for s in 0..slots {
                delete(
                    &slot_map,
                    &SlotKey {
                        service: old,
                        slot: s,
                    },
                )
                .expect("slot delete");
            }
        }
        id += 1;
    })
    .line("flat: one service's endpoints changed (write slots + switch + delete old)");
    drop(template);
}
