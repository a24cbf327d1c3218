"""Using trained models: predict, explain, export."""
