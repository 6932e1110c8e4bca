"""The assembled gateway: the data directory and devid.toml (`datadir`), and the `devid serve` process (`server`)."""
