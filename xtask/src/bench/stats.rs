//! Pure helpers of the benchmark: parsing what wrk and /proc print, the
//! spread of repeated measurements, and refreshing a marked section of a
//! Markdown file. Unit-tested; no I/O here.

use anyhow::{bail, Context};

/// What one wrk run reports (`wrk --latency`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub rps: f64,
    pub p50_us: f64,
    pub p75_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    /// connect + read + write + timeout socket errors.
    pub socket_errors: u64,
    pub non_2xx: u64,
}

/// Parses a wrk duration such as `61.00us`, `1.23ms`, `2.00s`, `1.00m`
/// into microseconds.
pub fn parse_wrk_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(v * scale)
}

/// Parses the output of `wrk --latency`.
pub fn parse_wrk(out: &str) -> anyhow::Result<WrkResult> {
    let mut r = WrkResult::default();
    let (mut have_rps, mut have_requests) = (false, false);
    let mut pct = [None; 4];
    let mut in_dist = false;
    for line in out.lines() {
        let t = line.trim();
        if t.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            let mut f = t.split_whitespace();
            match (f.next(), f.next()) {
                (Some(p), Some(v)) if p.ends_with('%') => {
                    let us = parse_wrk_duration_us(v)
                        .with_context(|| format!("wrk latency line {t:?}"))?;
                    let slot = match p {
                        "50%" => 0,
                        "75%" => 1,
                        "90%" => 2,
                        "99%" => 3,
                        _ => continue,
                    };
                    pct[slot] = Some(us);
                    continue;
                }
                _ => in_dist = false,
            }
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().context("wrk Requests/sec")?;
            have_rps = true;
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().context("wrk Non-2xx count")?;
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in v.split(',') {
                let n = part.split_whitespace().nth(1).unwrap_or("0");
                r.socket_errors += n.parse::<u64>().context("wrk socket errors")?;
            }
        } else if t.contains(" requests in ") {
            r.requests = t
                .split_whitespace()
                .next()
                .unwrap_or("")
                .parse()
                .context("wrk request count")?;
            have_requests = true;
        }
    }
    if !have_rps || !have_requests {
        bail!("wrk printed no summary (no \"Requests/sec\" or \"requests in\" line):\n{out}");
    }
    match pct {
        [Some(a), Some(b), Some(c), Some(d)] => {
            (r.p50_us, r.p75_us, r.p90_us, r.p99_us) = (a, b, c, d);
        }
        _ => bail!("wrk printed no latency distribution (was --latency given?):\n{out}"),
    }
    Ok(r)
}

/// utime + stime (clock ticks) of a process, from `/proc/<pid>/stat`.
/// The command name may contain spaces and parentheses, so fields are
/// counted from the last `)`.
pub fn proc_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state(3) ppid(4) ... utime is field 14, stime 15 (1-based).
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// (busy, total) jiffies of all CPUs from the `cpu` line of `/proc/stat`;
/// idle and iowait are not busy.
pub fn proc_stat_busy(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]:
    // guest time is already counted in user.
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// `usage_usec` from a cgroup v2 `cpu.stat`.
pub fn cgroup_usage_usec(cpu_stat: &str) -> Option<u64> {
    cpu_stat.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == "usage_usec").then(|| v.trim().parse().ok())?
    })
}

/// A value in kB from `/proc/<pid>/status` (e.g. `VmRSS`, `VmHWM`).
pub fn status_kb(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        v.split_whitespace().next()?.parse().ok()
    })
}

/// Minimum, median and maximum of repeated measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// `None` for no values. The median of an even count is the mean of
    /// the two middle values.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            min: v[0],
            median,
            max: v[n - 1],
        })
    }
}

/// The `q`-quantile (0..=1) of sorted values, nearest-rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Replaces the text between `start` and `end` markers (kept) with `body`;
/// appends a new marked section when the markers are absent. Everything
/// outside the markers is left byte for byte.
pub fn replace_section(doc: &str, start: &str, end: &str, body: &str) -> anyhow::Result<String> {
    let body = body.trim_end_matches('\n');
    match (doc.find(start), doc.find(end)) {
        (Some(s), Some(e)) if e > s => {
            let head = &doc[..s + start.len()];
            let tail = &doc[e..];
            Ok(format!("{head}\n{body}\n{tail}"))
        }
        (None, None) => {
            let mut out = doc.trim_end_matches('\n').to_string();
            if !out.is_empty() {
                out.push_str("\n\n");
            }
            out.push_str(&format!("{start}\n{body}\n{end}\n"));
            Ok(out)
        }
        _ => bail!("BENCHMARKS.md has a broken {start} … {end} pair; fix or remove the markers"),
    }
}

/// Formats microseconds for a table: `87 µs`, `1.24 ms`.
pub fn fmt_us(us: f64) -> String {
    if us.is_nan() {
        "–".into()
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// Formats a ratio spread as `1.03 (0.98–1.10)`.
pub fn fmt_ratio(s: Option<Spread>) -> String {
    match s {
        Some(s) => format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max),
        None => "–".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 8s test @ http://10.244.0.3:8080/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.61ms  481.44us  12.42ms   80.10%
    Req/Sec    20.13k     1.21k   23.14k    71.25%
  Latency Distribution
     50%    1.55ms
     75%    1.81ms
     90%  2.10ms
     99%    3.01s
  320518 requests in 8.00s, 22.01MB read
  Socket errors: connect 2, read 5, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  40057.81
Transfer/sec:      2.75MB
";

    #[test]
    fn parses_wrk_latency_output() {
        let r = parse_wrk(WRK).unwrap();
        assert_eq!(r.requests, 320_518);
        assert!((r.rps - 40057.81).abs() < 1e-6);
        assert!((r.p50_us - 1550.0).abs() < 1e-6);
        assert!((r.p75_us - 1810.0).abs() < 1e-6);
        assert!((r.p90_us - 2100.0).abs() < 1e-6);
        assert!((r.p99_us - 3_010_000.0).abs() < 1e-3);
        assert_eq!(r.socket_errors, 8);
        assert_eq!(r.non_2xx, 7);
    }

    #[test]
    fn wrk_without_distribution_or_summary_is_an_error() {
        let no_dist: String = WRK
            .lines()
            .filter(|l| !l.contains('%') || l.contains("Stdev") || l.contains("Req/Sec"))
            .filter(|l| !l.contains("Latency Distribution"))
            .collect::<Vec<_>>()
            .join("\n");
        let e = parse_wrk(&no_dist).unwrap_err().to_string();
        assert!(e.contains("latency distribution"), "{e}");
        let e = parse_wrk("unable to connect to 10.0.0.1:80 Connection refused")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no summary"), "{e}");
    }

    #[test]
    fn wrk_durations() {
        assert_eq!(parse_wrk_duration_us("61.00us"), Some(61.0));
        assert_eq!(parse_wrk_duration_us("1.50ms"), Some(1500.0));
        assert_eq!(parse_wrk_duration_us("2.00s"), Some(2e6));
        assert_eq!(parse_wrk_duration_us("1.00m"), Some(60e6));
        assert_eq!(parse_wrk_duration_us("12"), None);
        assert_eq!(parse_wrk_duration_us("3.0xs"), None);
    }

    #[test]
    fn proc_stat_with_awkward_comm() {
        // comm "(a) b)" contains a space and parentheses; utime=7, stime=5.
        let stat = "1234 ((a) b)) S 1 1234 1234 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0 42 0 0";
        assert_eq!(proc_stat_ticks(stat), Some(12));
        assert_eq!(proc_stat_ticks("garbage"), None);
    }

    #[test]
    fn machine_busy_time() {
        let stat = "cpu  100 5 50 1000 20 3 2 0 7 0\ncpu0 50 2 25 500 10 1 1 0 0 0\n";
        // busy = 100+5+50+3+2+0, total adds idle 1000 and iowait 20.
        assert_eq!(proc_stat_busy(stat), Some((160, 1180)));
        assert_eq!(proc_stat_busy("cpu0 1 2 3\n"), None);
    }

    #[test]
    fn cgroup_and_status_fields() {
        let cpu = "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\n";
        assert_eq!(cgroup_usage_usec(cpu), Some(123_456));
        assert_eq!(cgroup_usage_usec("user_usec 1\n"), None);
        let status = "Name:\tkmesh-daemon\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(status_kb(status, "VmRSS"), Some(10240));
        assert_eq!(status_kb(status, "VmHWM"), Some(20480));
        assert_eq!(status_kb(status, "VmSwap"), None);
    }

    #[test]
    fn spread_and_quantiles() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(Spread::of(&[]).is_none());
        assert!(Spread::of(&[f64::NAN]).is_none());
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn section_replacement_keeps_the_rest() {
        let (s, e) = ("<!-- b:start -->", "<!-- b:end -->");
        let doc = format!("# T\n\nintro\n{s}\nold\n{e}\n\n## other\nkept\n");
        let out = replace_section(&doc, s, e, "new\nlines\n").unwrap();
        assert_eq!(
            out,
            format!("# T\n\nintro\n{s}\nnew\nlines\n{e}\n\n## other\nkept\n")
        );
        let out = replace_section("# T\n", s, e, "body").unwrap();
        assert_eq!(out, format!("# T\n\n{s}\nbody\n{e}\n"));
        assert!(replace_section(&format!("{e}\n{s}\n"), s, e, "x").is_err());
        assert!(replace_section(&format!("{s}\n"), s, e, "x").is_err());
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_us(87.4), "87 µs");
        assert_eq!(fmt_us(1240.0), "1.24 ms");
        assert_eq!(fmt_us(2.5e6), "2.50 s");
        assert_eq!(fmt_ratio(Spread::of(&[1.0, 1.1, 0.9])), "1.00 (0.90–1.10)");
        assert_eq!(fmt_ratio(None), "–");
    }
}
