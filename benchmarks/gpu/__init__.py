"""The one-script GPU check (device_check.sh) and the Python stages it runs."""
