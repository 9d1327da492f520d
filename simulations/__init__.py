"""Research side: simulated federations, bundled data, metrics, the demo and the CLI."""
