"""One command line per dataset, turning its official release into the prepared tables (and SIIM's masks) that the
evaluation and fine-tuning scripts read: `python dataset_prep/rsna.py …` or `python -m dataset_prep.rsna …`."""
