//! Access log lines in Kmesh's format, and a JSON form.
//!
//! ```text
//! accesslog: 2026-11-25 02:40:01.123456789 +0000 UTC src.addr=10.244.0.2:41234, src.workload=unknown, src.namespace=unknown, dst.addr=10.244.0.3:8080, dst.service=web, dst.workload=unknown, dst.namespace=unknown, direction=OUTBOUND, sent_bytes=12, received_bytes=17, duration=1.234ms
//! ```

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{
    event::Connection,
    identity::{Identity, UNKNOWN},
    metrics::{istio_labels, workloads},
    workload::Workloads,
};

/// Output form of the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// Kmesh's `accesslog: … key=value, …` line.
    #[default]
    Text,
    /// One JSON object per line, same fields.
    Json,
}

/// Fields of one access log entry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    pub time: String,
    #[serde(rename = "src.addr")]
    pub src_addr: String,
    #[serde(rename = "src.workload")]
    pub src_workload: String,
    #[serde(rename = "src.namespace")]
    pub src_namespace: String,
    #[serde(rename = "dst.addr")]
    pub dst_addr: String,
    #[serde(rename = "dst.service")]
    pub dst_service: String,
    #[serde(rename = "dst.workload")]
    pub dst_workload: String,
    #[serde(rename = "dst.namespace")]
    pub dst_namespace: String,
    pub direction: &'static str,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    pub duration: String,
    pub srtt_us: u32,
    pub retransmits: u32,
}

impl Entry {
    /// `wall_now`/`mono_now` are read together, to date the kernel's
    /// CLOCK_MONOTONIC timestamp on the wall clock.
    pub fn new(
        c: &Connection,
        id: &Identity,
        wl: &Workloads,
        wall_now: SystemTime,
        mono_now_ns: u64,
    ) -> Entry {
        let labels = istio_labels(c, id, wl);
        let (src_w, dst_w) = workloads(c, wl);
        let (src, dst) = c.src_dst();
        let at = wall_now - Duration::from_nanos(mono_now_ns.saturating_sub(c.end_ns));
        Entry {
            time: format_time(at),
            src_addr: src.to_string(),
            src_workload: src_w.map_or(UNKNOWN, |w| &w.name).to_string(),
            src_namespace: src_w.map_or(UNKNOWN, |w| &w.namespace).to_string(),
            dst_addr: dst.to_string(),
            // destination_service
            dst_service: labels[14].clone(),
            dst_workload: dst_w.map_or(UNKNOWN, |w| &w.name).to_string(),
            // The workload's namespace, else the service's.
            dst_namespace: dst_w.map_or_else(|| labels[16].clone(), |w| w.namespace.clone()),
            direction: c.direction.as_str(),
            sent_bytes: c.bytes_sent,
            received_bytes: c.bytes_received,
            duration: format_duration(c.duration),
            srtt_us: c.srtt_us,
            retransmits: c.total_retrans,
        }
    }

    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Json => serde_json::to_string(self).unwrap_or_default(),
            Format::Text => format!(
                "accesslog: {} src.addr={}, src.workload={}, src.namespace={}, dst.addr={}, dst.service={}, dst.workload={}, dst.namespace={}, direction={}, sent_bytes={}, received_bytes={}, duration={}",
                self.time,
                self.src_addr,
                self.src_workload,
                self.src_namespace,
                self.dst_addr,
                self.dst_service,
                self.dst_workload,
                self.dst_namespace,
                self.direction,
                self.sent_bytes,
                self.received_bytes,
                self.duration
            ),
        }
    }
}

/// `2026-11-25 02:40:01.123456789 +0000 UTC`, as Kmesh (Go's time.Time) prints.
pub fn format_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02} {:02}:{:02}:{:02}.{:09} +0000 UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Go's `time.Duration` text form: `1.5s`, `2.345ms`, `870µs`, `12ns`.
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    let (unit, div) = if ns >= 1_000_000_000 {
        ("s", 1e9)
    } else if ns >= 1_000_000 {
        ("ms", 1e6)
    } else if ns >= 1_000 {
        ("µs", 1e3)
    } else {
        return format!("{ns}ns");
    };
    let v = ns as f64 / div;
    let s = format!("{v:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_and_duration_forms() {
        let t = UNIX_EPOCH + Duration::new(1_795_000_000, 5);
        assert_eq!(format_time(t), "2026-11-18 11:06:40.000000005 +0000 UTC");
        assert_eq!(
            format_time(UNIX_EPOCH),
            "1970-01-01 00:00:00.000000000 +0000 UTC"
        );
        assert_eq!(format_duration(Duration::from_micros(2345)), "2.345ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_nanos(870_000)), "870µs");
        assert_eq!(format_duration(Duration::from_nanos(12)), "12ns");
    }
}
