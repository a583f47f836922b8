"""The control plane, once per proxy: providers -> watcher -> table, health, ACME, publisher."""
