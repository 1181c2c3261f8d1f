"""Reading tables and the datasets built from them."""
