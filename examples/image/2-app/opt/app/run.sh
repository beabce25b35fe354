#!/bin/sh
echo "app v1"
