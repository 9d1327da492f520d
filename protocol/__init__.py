"""The contract shared by clients and the coordinator: pure logic, no I/O of its own."""
