"""One command line per dataset, turning its official release into the prepared tables (and SIIM's masks) that the
evaluation and fine-tuning scripts read: `python -m dataset_prep.rsna …`, or `ace-lora-prepare rsna …` for any."""
