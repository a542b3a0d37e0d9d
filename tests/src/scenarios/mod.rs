//! Every VM scenario, by name. Each proves one rule of the design.

mod module;

use crate::guest::Scenario;

/// All scenarios, in the order the suite runs them.
pub const ALL: &[Scenario] = &[
    Scenario {
        name: "load_creates_pairs",
        run: module::load_creates_pairs,
    },
    Scenario {
        name: "default_is_8_devices",
        run: module::default_is_8_devices,
    },
    Scenario {
        name: "bad_params_refused",
        run: module::bad_params_refused,
    },
    Scenario {
        name: "info_reports_status",
        run: module::info_reports_status,
    },
    Scenario {
        name: "unknown_ioctl_enotty",
        run: module::unknown_ioctl_enotty,
    },
    Scenario {
        name: "rmmod_removes_nodes",
        run: module::rmmod_removes_nodes,
    },
    Scenario {
        name: "load_unload_10x",
        run: module::load_unload_10x,
    },
];
