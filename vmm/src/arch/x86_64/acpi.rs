//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) built with the acpi_tables crate.
