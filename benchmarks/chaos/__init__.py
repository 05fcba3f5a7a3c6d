"""Multi-host chaos harness (issue 16): hosts in network namespaces (``netns``), seeded fault
injection (``faults``), a userspace delay proxy (``proxy``), and the workloads and goodput
analysis built on them."""
