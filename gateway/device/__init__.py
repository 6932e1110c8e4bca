"""The device side: credentials and a checked gateway (`client`), the enrollment flow (`enroll`), the simulator."""
