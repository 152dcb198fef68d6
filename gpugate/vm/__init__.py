"""The VM targets (AWS, GCP): systemd units from the service table, and the cloud-init user data that installs them."""
