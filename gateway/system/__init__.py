"""Operating-system ground floor shared by every room: crash-safe files (`fs`), worker processes that end with their parent (`lifeline`), JSON log lines (`logs`)."""
