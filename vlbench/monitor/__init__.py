"""What a run reports about itself: progress lines (`progress`), time by phase (`timing`) and the operation counts behind its time estimate (`cost`)."""
