"""One module per table; each defines TABLE (see vajrad/schema.py)."""
from vajrad.schema import BIGINT, INTEGER, TEXT, Column, Table

TABLE = Table(
    "security_products",
    "Security products known to the catalogue (vajrad/collectors/products/catalogue/ plus the config's "
    "security_products), one row each, installed or not, and the kernel's own protections (rows named "
    "kernel-*: LSMs, AppArmor, SELinux, lockdown, audit, BPF). The Linux counterpart of osquery's "
    "windows_security_products. Live.",
    (
        Column("name", TEXT, "Product name, as in the catalogue; kernel-* for kernel facts", index=True),
        Column("vendor", TEXT, "Vendor or project"),
        Column("type", TEXT, "av, edr, hids, lsm, firewall, audit, fim or rootkit"),
        Column("installed", INTEGER, "1 when its package is installed or a binary or process of it is present"),
        Column("package", TEXT, "The installed Debian package that provides it"),
        Column("version", TEXT, "That package's version"),
        Column("install_path", TEXT, "Its main binary, where present"),
        Column("unit", TEXT, "Its systemd unit (the first the catalogue names that exists)"),
        Column("active_state", TEXT, "systemd ActiveState, when systemd runs; else the process view: "
                                     "active or inactive"),
        Column("sub_state", TEXT, "systemd SubState, when systemd runs; else running or dead"),
        Column("unit_file_state", TEXT, "enabled, disabled, masked or static, read from the unit files "
                                        "(systemd's answer when it runs)"),
        Column("pid", BIGINT, "A running process of the product (the oldest), 0 when none"),
        Column("running", INTEGER, "1 when a process of it runs (matched on its resolved executable)"),
        Column("state", TEXT, "protecting, degraded, stopped, not_installed or unknown"),
        Column("state_reason", TEXT, "Why the state is not protecting (empty when it is)"),
        Column("signatures_version", TEXT, "Version of its newest signature database"),
        Column("signatures_time", BIGINT, "Build time of that database, unix seconds"),
        Column("signatures_up_to_date", INTEGER, "1 when the database is younger than the catalogue's limit"),
        Column("binary_sha256", TEXT, "SHA256 of its main binary"),
        Column("details", TEXT, "JSON: further facts (health output, rule counts, profiles, LSMs, ...)"),
        Column("last_checked", BIGINT, "When this row was last evaluated, unix seconds"),
    ),
    evented=False,
    summary=("name", "type", "installed", "running", "state", "state_reason"),
)
