"""What tests share: subprocess runs and what they leave behind (train), fault injectors, free ports, moto and reseal (faultinject), datasets on disk (fixtures)."""
