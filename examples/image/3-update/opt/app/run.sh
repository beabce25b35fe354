#!/bin/sh
echo "app v2"
