# A package, so tests/chaos/test_harness.py and tests/test_harness.py can both be collected.
