"""Factory provisioning: devices with keys, factory certificates (IDevID) and secure-element layouts."""
