//! Every VM scenario, by name. Each proves one rule of the design.

mod backends;
mod cow;
mod data;
mod delegation;
mod examples;
mod file_io;
mod filters;
mod hostile;
mod languages;
mod module;
mod package;
mod power_cut;
mod recovery;
mod requests;
mod safety;
mod serve;
mod servers;
mod setup;
mod standalone;

pub use requests::ioctls_on_fd3;

use crate::guest::Scenario;

/// Scenarios the harness runs in boots of their own (tests/vm/run.sh).
pub const POWER_CUT: &[Scenario] = &[
    Scenario {
        name: "power_cut_write",
        run: power_cut::power_cut_write,
    },
    Scenario {
        name: "power_cut_check",
        run: power_cut::power_cut_check,
    },
];

macro_rules! scenarios {
    ($($module:ident :: $name:ident),* $(,)?) => {
        /// All scenarios, in the order the suite runs them.
        pub const ALL: &[Scenario] = &[$(Scenario { name: stringify!($name), run: $module::$name }),*];
    };
}

scenarios![
    // Loading the module.
    module::load_creates_pairs,
    module::default_is_8_devices,
    module::bad_params_refused,
    module::info_reports_status,
    module::unknown_ioctl_enotty,
    module::rmmod_removes_nodes,
    module::load_unload_10x,
    // The protocol, rule by rule.
    setup::setup_rules,
    data::dd_patterns,
    data::ext4_roundtrip,
    data::batching,
    requests::flush_fua_discard,
    data::read_only,
    requests::bad_input,
    recovery::requeue_on_release,
    safety::fence_stalled_server,
    recovery::no_server_waits,
    data::back_pressure,
    setup::reset_fails_outstanding,
    recovery::device_failure,
    setup::non_root_refused,
    delegation::delegated_server_without_root,
    data::partitions,
    setup::rmmod_while_configured,
    requests::poll_readiness,
    requests::fuzz_ioctls,
    // The fast path: SERVE, wake-one, several hardware queues.
    serve::serve_rules,
    serve::serve_wakes_one,
    serve::serve_hands_on_what_does_not_fit,
    serve::queues_served_by_any,
    // Protocol safety (reconfiguration, errors, servers that notice).
    safety::reset_leaves_nothing_behind,
    safety::status_round_trip_reconnect,
    safety::reconnect_changes_only_given,
    safety::server_stops_when_reset,
    safety::errno_reaches_filesystem,
    safety::put_errno_rules,
    safety::put_zeroes_rules,
    file_io::put_file_rules,
    safety::file_direct_alignment_checked,
    safety::compat_ioctl_32bit,
    // A hostile server (design: the server is untrusted).
    hostile::hostile_blocking_file_then_reset,
    hostile::hostile_blocking_file_fenced,
    hostile::hostile_unkillable_move_failed,
    hostile::hostile_unkillable_write_waits_for_reset,
    hostile::hostile_file_on_own_device,
    hostile::hostile_fence_reaches_thread_group,
    hostile::hostile_user_copy_fault_across_reset,
    hostile::hostile_errnos_whitelisted,
    // The real servers.
    servers::file_server_ext4,
    servers::fio_threads_and_processes,
    servers::kill_server_during_fio,
    servers::fsync_reaches_server,
    servers::discard_punches_holes,
    servers::null_server,
    servers::abusectl_errors,
    // The cow server.
    cow::cow_ext4_modify_merge,
    cow::cow_kill_during_fio,
    cow::cow_block_device_base,
    cow::cow_over_abuse_device,
    // Storage users already have.
    backends::nbd_backend,
    backends::nbd_errors_reach_the_reader,
    backends::nbd_backend_qemu_nbd,
    backends::nbd_slow_server,
    backends::qcow2_backend,
    // Servers in other languages (examples/c, python).
    languages::c_ramdisk_server,
    languages::python_ramdisk_server,
    // Servers written on the library (servers/examples/).
    examples::example_ramdisk_server,
    examples::example_xor_server,
    // The Debian package (make deb), installed with dpkg and used.
    package::deb_package_installs_and_serves,
    // Filters over the real servers (--filter).
    filters::filter_error_ext4,
    filters::filter_delay_latency,
    filters::filter_rate_iops,
];
