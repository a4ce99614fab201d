//! Counters for everything an operator wants to graph, lock-free (atomics) so hot paths
//! (vCPU exits, device I/O) can count without contention.
//!
//! Two views of the same counters:
//! - a JSON object per flush (every 60 s and on `FlushMetrics`) to the `metrics` file or
//!   pipe, grouped as Firecracker groups them; counts are the change since the previous
//!   flush, gauges their current value;
//! - Prometheus text (`GET /metrics/prometheus`, an ember extension) with running totals, as
//!   Prometheus counters must never go down.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::config::MetricsConfig;

/// A monotonically increasing count.
pub struct Counter {
    total: AtomicU64,
    flushed: AtomicU64,
}

impl Counter {
    pub const fn new() -> Self {
        Counter {
            total: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
        }
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The change since the previous call; the next call starts from here.
    fn take_delta(&self) -> u64 {
        let now = self.total();
        now.wrapping_sub(self.flushed.swap(now, Ordering::Relaxed))
    }
}

impl Default for Counter {
    fn default() -> Self {
        Self::new()
    }
}

/// A value that is set, not counted (a latency, a size).
pub struct Gauge(AtomicU64);

impl Gauge {
    pub const fn new() -> Self {
        Gauge(AtomicU64::new(0))
    }

    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for Gauge {
    fn default() -> Self {
        Self::new()
    }
}

/// One metric as the serializers see it.
pub enum Metric<'a> {
    Count(&'a Counter),
    Value(&'a Gauge),
}

/// A named set of metrics, flushed together.
pub trait Group: Send + Sync {
    fn metrics(&self) -> Vec<(&'static str, Metric<'_>)>;
}

/// One device's own counters. Each count also goes to the group that sums every device of
/// the kind (`block`), so the sum is exact without adding devices up at flush time.
pub struct DeviceCounters<G: 'static> {
    own: Arc<G>,
    sum: &'static G,
}

impl<G: Group + Default + 'static> DeviceCounters<G> {
    pub fn new(sum: &'static G) -> Self {
        DeviceCounters {
            own: Arc::new(G::default()),
            sum,
        }
    }

    pub fn add(&self, pick: impl Fn(&G) -> &Counter, n: u64) {
        pick(&self.own).add(n);
        pick(self.sum).add(n);
    }

    pub fn inc(&self, pick: impl Fn(&G) -> &Counter) {
        self.add(pick, 1);
    }

    /// This device's counters alone.
    pub fn own(&self) -> &G {
        &self.own
    }

    /// This device's counters as a group to register with [`Metrics::register_device`].
    pub fn group(&self) -> Arc<dyn Group> {
        self.own.clone()
    }
}

/// A device's metrics as the device manager registers them.
pub struct DeviceGroup {
    /// The device kind: the aggregate group's name (`block`, `net`).
    pub kind: &'static str,
    pub id: String,
    pub group: Arc<dyn Group>,
}

/// Keeps a device's metrics in every flush until dropped.
pub struct DeviceRegistration {
    metrics: &'static Metrics,
    group: Arc<dyn Group>,
}

impl Drop for DeviceRegistration {
    fn drop(&mut self) {
        let mut devices = self
            .metrics
            .devices
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Only this registration's group: one that replaced it under the same name stays.
        devices.retain(|d| !Arc::ptr_eq(&d.group, &self.group));
    }
}

/// Declares a group of counters and gauges with a const constructor, so the whole metrics
/// tree can be one `static`.
macro_rules! metric_group {
    ($(#[$meta:meta])* $name:ident {
        $(counters: [$($(#[$cm:meta])* $c:ident),* $(,)?] $(,)?)?
        $(gauges: [$($(#[$gm:meta])* $g:ident),* $(,)?] $(,)?)?
    }) => {
        $(#[$meta])*
        pub struct $name {
            $($($(#[$cm])* pub $c: Counter,)*)?
            $($($(#[$gm])* pub $g: Gauge,)*)?
        }

        impl $name {
            pub const fn new() -> Self {
                $name {
                    $($($c: Counter::new(),)*)?
                    $($($g: Gauge::new(),)*)?
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl Group for $name {
            fn metrics(&self) -> Vec<(&'static str, Metric<'_>)> {
                vec![
                    $($((stringify!($c), Metric::Count(&self.$c)),)*)?
                    $($((stringify!($g), Metric::Value(&self.$g)),)*)?
                ]
            }
        }
    };
}

metric_group!(
    /// The API server itself.
    ApiServerMetrics {
        counters: [connections_accepted, connections_refused, malformed_requests,
            requests_too_large, read_timeouts, sync_response_fails,
            /// Clients disconnected for not reading their responses.
            write_timeouts,
            /// Idle connections closed to make room for a new one.
            idle_connections_closed],
        gauges: [process_startup_time_us],
    }
);
metric_group!(
    /// GET requests by endpoint.
    GetRequestMetrics {
        counters: [instance_info_count, version_count, machine_cfg_count, vm_config_count,
            prometheus_count, mmds_count],
    }
);
metric_group!(
    /// PUT requests by endpoint, with their failures.
    PutRequestMetrics {
        counters: [actions_count, actions_fails, boot_source_count, boot_source_fails,
            drive_count, drive_fails, logger_count, logger_fails, machine_cfg_count,
            machine_cfg_fails, metrics_count, metrics_fails, network_count, network_fails,
            snapshot_create_count, snapshot_create_fails, snapshot_load_count,
            snapshot_load_fails, vfio_count, vfio_fails, mmds_count, mmds_fails,
            mmds_config_count, mmds_config_fails, entropy_count, entropy_fails, vsock_count,
            vsock_fails],
    }
);
metric_group!(
    /// PATCH requests by endpoint, with their failures.
    PatchRequestMetrics {
        counters: [drive_count, drive_fails, machine_cfg_count, machine_cfg_fails,
            network_count, network_fails, vm_count, vm_fails, mmds_count, mmds_fails],
    }
);
metric_group!(
    /// vCPU exits by kind.
    VcpuMetrics {
        counters: [exit_io_in, exit_io_out, exit_mmio_read, exit_mmio_write, failures],
    }
);
metric_group!(
    /// The controller.
    VmmMetrics {
        counters: [instance_starts, pauses, resumes,
            /// Register accesses and device set-ups a guest got wrong (answered, ignored).
            guest_errors,
            /// Interrupts that could not be raised (the eventfd counter was full).
            interrupt_errors,
            /// Log lines dropped: guest-triggered ones over their rate limit, or lines a
            /// full log destination could not take.
            log_lines_dropped],
    }
);
metric_group!(
    /// Time taken by lifecycle operations, last value in microseconds.
    LatencyMetrics {
        gauges: [instance_start_us, pause_vm_us, resume_vm_us, full_create_snapshot_us,
            diff_create_snapshot_us, load_snapshot_us],
    }
);
metric_group!(
    /// The serial console.
    UartMetrics {
        counters: [read_count, write_count, missed_write_count, input_bytes,
            /// Guest output bytes dropped because the host's console did not keep up.
            output_dropped_bytes],
    }
);
metric_group!(
    /// The i8042 keyboard controller.
    I8042Metrics {
        counters: [reset_count, read_count, write_count, ctrl_alt_del_count,
            /// Bytes dropped because the guest did not read the output buffer.
            missed_bytes],
    }
);
metric_group!(
    /// Block devices, summed over all drives.
    BlockMetrics {
        counters: [read_count, write_count, flush_count, read_bytes, write_bytes,
            invalid_reqs_count, io_errors, rate_limiter_throttled,
            /// Times the guest broke a drive's queue (an available index the ring cannot
            /// hold): the drive then ignores it until the driver resets the device.
            queue_broken],
    }
);
metric_group!(
    /// Network devices, summed over all interfaces.
    NetMetrics {
        counters: [rx_packets_count, tx_packets_count, rx_bytes_count, tx_bytes_count,
            /// Frames from the TAP that could not be delivered (too large for the guest's
            /// buffer, shorter than a header, dropped by a reset).
            rx_fails,
            /// Frames the guest sent that did not reach the TAP.
            tx_fails,
            tap_read_fails, tap_write_fails,
            /// Transmit chains dropped for their shape (writable, outside guest memory,
            /// too short or too long, a header asking for what was not negotiated).
            tx_malformed_frames,
            /// Receive chains returned unused for their shape.
            rx_malformed_chains,
            /// Times a frame waited because the guest had no receive buffer.
            no_rx_avail_buffer,
            rx_rate_limiter_throttled, tx_rate_limiter_throttled, rx_tap_event_count],
    }
);
metric_group!(
    /// The entropy device.
    EntropyMetrics {
        counters: [
            /// Requests answered with random bytes, and the bytes.
            entropy_event_count, entropy_bytes,
            /// Requests answered empty: the host's getrandom failed.
            host_rng_fails,
            /// Chains with a buffer the device may not write, returned empty.
            invalid_requests,
            /// Times a request waited for the rate limiter.
            rate_limiter_throttled],
    }
);
metric_group!(
    /// vsock devices: rx is toward the guest, tx from it.
    VsockMetrics {
        counters: [rx_packets_count, tx_packets_count, rx_bytes_count, tx_bytes_count,
            conns_added, conns_removed,
            /// Connections the device ended with an RST (guest error, host socket error,
            /// timeout).
            conns_killed,
            /// Connection requests refused because the device holds its maximum.
            conns_refused,
            /// Guest connections to a host port nobody listens on.
            connect_fails,
            /// Host connections closed before or for their CONNECT line.
            handshake_fails,
            /// Guest data the host socket refused (it failed, not just full).
            tx_write_fails,
            /// Guest packets that were malformed or not valid where they came.
            malformed_packets,
            /// Guests that sent more than their credit.
            credit_violations,
            /// RSTs answering packets of no connection.
            rst_replies,
            /// Such RSTs dropped because too many waited for receive buffers.
            replies_dropped,
            /// Receive or event chains returned unused for their shape.
            rx_malformed_chains,
            /// Times the guest broke a queue (the device then waits for a reset).
            queue_broken],
    }
);
metric_group!(
    /// Signals ember received.
    SignalMetrics {
        counters: [sigterm, sigint, sighup],
    }
);
metric_group!(
    /// Seccomp violations (filters are not installed yet, so this stays 0).
    SeccompMetrics {
        counters: [num_faults],
    }
);
metric_group!(
    /// The metrics system itself.
    MetricsSystemMetrics {
        counters: [flushes, write_fails],
    }
);

/// Every group, in the order they appear in a flushed line.
pub struct Metrics {
    pub api_server: ApiServerMetrics,
    pub get_api_requests: GetRequestMetrics,
    pub put_api_requests: PutRequestMetrics,
    pub patch_api_requests: PatchRequestMetrics,
    pub vcpu: VcpuMetrics,
    pub vmm: VmmMetrics,
    pub latencies_us: LatencyMetrics,
    pub uart: UartMetrics,
    pub i8042: I8042Metrics,
    pub block: BlockMetrics,
    pub net: NetMetrics,
    pub entropy: EntropyMetrics,
    pub vsock: VsockMetrics,
    pub signals: SignalMetrics,
    pub seccomp: SeccompMetrics,
    pub metrics: MetricsSystemMetrics,
    /// Per-device groups (`block_<drive_id>`), in the order the devices were attached.
    devices: Mutex<Vec<DeviceGroup>>,
}

pub static METRICS: Metrics = Metrics::new();

impl Metrics {
    pub const fn new() -> Self {
        Metrics {
            api_server: ApiServerMetrics::new(),
            get_api_requests: GetRequestMetrics::new(),
            put_api_requests: PutRequestMetrics::new(),
            patch_api_requests: PatchRequestMetrics::new(),
            vcpu: VcpuMetrics::new(),
            vmm: VmmMetrics::new(),
            latencies_us: LatencyMetrics::new(),
            uart: UartMetrics::new(),
            i8042: I8042Metrics::new(),
            block: BlockMetrics::new(),
            net: NetMetrics::new(),
            entropy: EntropyMetrics::new(),
            vsock: VsockMetrics::new(),
            signals: SignalMetrics::new(),
            seccomp: SeccompMetrics::new(),
            metrics: MetricsSystemMetrics::new(),
            devices: Mutex::new(Vec::new()),
        }
    }

    /// Adds a device's own group to every flush, as `<kind>_<id>` in JSON and with an `id`
    /// label in Prometheus, until the returned registration is dropped. A device attached
    /// again under the same id (the VM was rebuilt) replaces the earlier one.
    pub fn register_device(&'static self, device: DeviceGroup) -> DeviceRegistration {
        let group = device.group.clone();
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        devices.retain(|d| (d.kind, d.id.as_str()) != (device.kind, device.id.as_str()));
        devices.push(device);
        DeviceRegistration {
            metrics: self,
            group,
        }
    }

    fn groups(&self) -> [(&'static str, &dyn Group); 16] {
        [
            ("api_server", &self.api_server),
            ("get_api_requests", &self.get_api_requests),
            ("put_api_requests", &self.put_api_requests),
            ("patch_api_requests", &self.patch_api_requests),
            ("vcpu", &self.vcpu),
            ("vmm", &self.vmm),
            ("latencies_us", &self.latencies_us),
            ("uart", &self.uart),
            ("i8042", &self.i8042),
            ("block", &self.block),
            ("net", &self.net),
            ("entropy", &self.entropy),
            ("vsock", &self.vsock),
            ("signals", &self.signals),
            ("seccomp", &self.seccomp),
            ("metrics", &self.metrics),
        ]
    }

    /// One flush: counts since the previous flush, gauges as they are now.
    pub fn flush_json(&self) -> Map<String, Value> {
        let mut root = Map::new();
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        root.insert("utc_timestamp_ms".into(), ms.into());
        for (group_name, group) in self.groups() {
            root.insert(group_name.into(), group_json(group));
        }
        let devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        for device in devices.iter() {
            root.insert(
                format!("{}_{}", device.kind, device.id),
                group_json(device.group.as_ref()),
            );
        }
        root
    }

    /// Prometheus text exposition format, version 0.0.4. A device's own counters are
    /// `ember_device_<kind>_<name>{id="..."}`, apart from the sums, so that summing a
    /// metric over its series never counts a device twice.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        for (group_name, group) in self.groups() {
            for (name, metric) in group.metrics() {
                let full = format!("ember_{group_name}_{name}");
                let (kind, value) = prometheus_value(&metric);
                let _ = writeln!(out, "# TYPE {full} {kind}\n{full} {value}");
            }
        }
        let devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let mut kinds: Vec<&'static str> = devices.iter().map(|d| d.kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        for kind in kinds {
            let of_kind: Vec<&DeviceGroup> = devices.iter().filter(|d| d.kind == kind).collect();
            let Some(first) = of_kind.first() else {
                continue;
            };
            // One TYPE line per metric name, then one sample per device.
            for (index, (name, metric)) in first.group.metrics().iter().enumerate() {
                let full = format!("ember_device_{kind}_{name}");
                let _ = writeln!(out, "# TYPE {full} {}", prometheus_value(metric).0);
                for device in &of_kind {
                    if let Some((_, m)) = device.group.metrics().get(index) {
                        let _ = writeln!(
                            out,
                            "{full}{{id=\"{}\"}} {}",
                            escape_label(&device.id),
                            prometheus_value(m).1
                        );
                    }
                }
            }
        }
        out
    }
}

/// A group's metrics as one JSON object: counts since the previous flush, gauges as they are.
fn group_json(group: &dyn Group) -> Value {
    let obj = group
        .metrics()
        .into_iter()
        .map(|(name, metric)| {
            let v = match metric {
                Metric::Count(c) => c.take_delta(),
                Metric::Value(g) => g.get(),
            };
            (name.to_owned(), Value::from(v))
        })
        .collect();
    Value::Object(obj)
}

/// The Prometheus type and the running value of a metric.
fn prometheus_value(metric: &Metric<'_>) -> (&'static str, u64) {
    match metric {
        Metric::Count(c) => ("counter", c.total()),
        Metric::Value(g) => ("gauge", g.get()),
    }
}

/// A label value as the exposition format quotes it.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot open metrics file {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write metrics: {0}")]
    Write(std::io::Error),
}

/// Where flushed metrics go: a file (appended) or a named pipe, one JSON object per line.
pub struct MetricsSink {
    file: std::fs::File,
    instance_id: Option<String>,
    properties: Option<std::collections::BTreeMap<String, String>>,
}

impl MetricsSink {
    pub fn open(config: &MetricsConfig, instance_id: &str) -> Result<Self, MetricsError> {
        let file = crate::host_file::open_sink(std::path::Path::new(&config.metrics_path))
            .map_err(|source| MetricsError::Open {
                path: config.metrics_path.clone(),
                source,
            })?;
        crate::seccomp::set_metrics_fd(std::os::fd::AsRawFd::as_raw_fd(&file));
        Ok(MetricsSink {
            file,
            instance_id: config.emit_id.then(|| instance_id.to_owned()),
            properties: config.properties.clone(),
        })
    }

    /// Writes one line with the counters of `metrics`.
    pub fn flush(&mut self, metrics: &Metrics) -> Result<(), MetricsError> {
        metrics.metrics.flushes.inc();
        let mut line = metrics.flush_json();
        if let Some(id) = &self.instance_id {
            line.insert("id".into(), id.clone().into());
        }
        if let Some(props) = &self.properties {
            let obj = props
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.clone())))
                .collect();
            line.insert("properties".into(), Value::Object(obj));
        }
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        self.file.write_all(text.as_bytes()).map_err(|e| {
            metrics.metrics.write_fails.inc();
            MetricsError::Write(e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_reports_deltas_prometheus_totals() {
        let m = Metrics::new();
        m.vcpu.exit_io_out.add(5);
        m.latencies_us.pause_vm_us.set(42);
        let first = m.flush_json();
        assert_eq!(first["vcpu"]["exit_io_out"], 5);
        assert_eq!(first["latencies_us"]["pause_vm_us"], 42);
        m.vcpu.exit_io_out.add(2);
        let second = m.flush_json();
        assert_eq!(
            second["vcpu"]["exit_io_out"], 2,
            "delta since the last flush"
        );
        assert_eq!(
            second["latencies_us"]["pause_vm_us"], 42,
            "gauges are not reset"
        );
        let text = m.prometheus();
        assert!(
            text.contains("# TYPE ember_vcpu_exit_io_out counter\nember_vcpu_exit_io_out 7\n"),
            "{text}"
        );
        assert!(
            text.contains("ember_latencies_us_pause_vm_us 42\n"),
            "{text}"
        );
    }

    #[test]
    fn each_device_counts_alone_and_in_the_sum() {
        let m: &'static Metrics = Box::leak(Box::new(Metrics::new()));
        let root = DeviceCounters::new(&m.block);
        let data = DeviceCounters::new(&m.block);
        let root_reg = m.register_device(DeviceGroup {
            kind: "block",
            id: "rootfs".into(),
            group: root.group(),
        });
        let data_reg = m.register_device(DeviceGroup {
            kind: "block",
            id: "data\"1".into(),
            group: data.group(),
        });
        root.add(|b| &b.read_bytes, 512);
        data.add(|b| &b.read_bytes, 4096);
        data.inc(|b| &b.io_errors);
        let json = m.flush_json();
        assert_eq!(json["block"]["read_bytes"], 4608, "the sum over drives");
        assert_eq!(json["block_rootfs"]["read_bytes"], 512);
        assert_eq!(json["block_data\"1"]["read_bytes"], 4096);
        assert_eq!(json["block_data\"1"]["io_errors"], 1);
        assert_eq!(json["block_rootfs"]["io_errors"], 0);
        let text = m.prometheus();
        assert!(text.contains("ember_block_read_bytes 4608\n"), "{text}");
        assert_eq!(
            text.matches("# TYPE ember_device_block_read_bytes counter\n")
                .count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("ember_device_block_read_bytes{id=\"rootfs\"} 512\n"),
            "{text}"
        );
        assert!(
            text.contains("ember_device_block_read_bytes{id=\"data\\\"1\"} 4096\n"),
            "{text}"
        );
        // A detached device leaves the flushes; the sum keeps what it counted.
        drop(data_reg);
        let json = m.flush_json();
        assert!(json.get("block_data\"1").is_none());
        assert!(json.get("block_rootfs").is_some());
        assert!(!m.prometheus().contains("data"));
        // Attached again under the same id (a rebuilt VM), it replaces the earlier group.
        let again = DeviceCounters::new(&m.block);
        let _reg = m.register_device(DeviceGroup {
            kind: "block",
            id: "rootfs".into(),
            group: again.group(),
        });
        again.add(|b| &b.read_bytes, 1);
        assert_eq!(
            m.prometheus().matches("{id=\"rootfs\"}").count(),
            BlockMetrics::new().metrics().len()
        );
        // The earlier registration going away keeps the group that replaced it.
        drop(root_reg);
        assert!(
            m.prometheus()
                .contains("ember_device_block_read_bytes{id=\"rootfs\"} 1\n")
        );
    }

    #[test]
    fn every_group_present() {
        let json = Metrics::new().flush_json();
        for g in [
            "api_server",
            "get_api_requests",
            "put_api_requests",
            "patch_api_requests",
            "vcpu",
            "block",
            "net",
            "entropy",
            "vsock",
            "seccomp",
            "signals",
            "latencies_us",
        ] {
            assert!(json[g].is_object(), "{g}");
        }
    }

    #[test]
    fn sink_appends_lines_with_id_and_properties() {
        let path = std::env::temp_dir().join(format!("ember-metrics-{}", std::process::id()));
        let config = MetricsConfig {
            metrics_path: path.display().to_string(),
            emit_id: true,
            properties: Some([("host".to_string(), "edge-1".to_string())].into()),
        };
        let m = Metrics::new();
        let mut sink = MetricsSink::open(&config, "vm-7").unwrap();
        sink.flush(&m).unwrap();
        m.uart.write_count.add(3);
        sink.flush(&m).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["uart"]["write_count"], 3);
        assert_eq!(lines[1]["id"], "vm-7");
        assert_eq!(lines[1]["properties"]["host"], "edge-1");
        assert_eq!(lines[1]["metrics"]["flushes"], 1);
    }
}
