#!/usr/bin/env python3
"""Test helper around a moto_server started with INITIAL_NO_AUTH_ACTION_COUNT=3.

    moto_ec2.py setup ENDPOINT
        Spends the three unsigned calls on IAM (CreateUser, CreateAccessKey,
        PutUserPolicy allowing everything), so that every later request is
        SigV4-verified, and prints {"key_id", "secret", "image_id"} as JSON.
    moto_ec2.py bucket ENDPOINT NAME
        Creates an S3 bucket (dummy credentials) and prints {"bucket": NAME}.
    moto_ec2.py objects ENDPOINT NAME
        Prints the bucket's object keys as a JSON list.
    moto_ec2.py buckets ENDPOINT
        Prints every bucket's name as a JSON list.
    moto_ec2.py etags ENDPOINT NAME
        Prints {key: ETag} for the bucket's objects (a multipart upload's
        ETag ends in -<parts>).
    moto_ec2.py get ENDPOINT BUCKET KEY FILE
        Downloads KEY to FILE (boto3's transfer manager).
    moto_ec2.py put ENDPOINT BUCKET KEY FILE
        Uploads FILE as KEY (multipart when large) and prints {"key": KEY}.
    moto_ec2.py instances ENDPOINT KEY_ID SECRET [REGION]
        Prints every instance with its state, lifecycle, zone, tags, security
        group ids and decoded user data, as JSON.
    moto_ec2.py groups ENDPOINT KEY_ID SECRET [REGION]
        Prints every security group: id, name, tags and TCP ingress rules
        ([from, to, cidr]), as JSON.
"""

import base64
import json
import sys

import boto3


def client(service, endpoint, key_id="testing", secret="testing", region="us-east-1"):
    return boto3.client(service, endpoint_url=endpoint, region_name=region,
                        aws_access_key_id=key_id, aws_secret_access_key=secret)


def setup(endpoint):
    iam = client("iam", endpoint)
    iam.create_user(UserName="nembo")
    key = iam.create_access_key(UserName="nembo")["AccessKey"]
    iam.put_user_policy(UserName="nembo", PolicyName="all", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }))
    ec2 = client("ec2", endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    images = ec2.describe_images(Owners=["amazon"])["Images"]
    image = images[0]["ImageId"]
    other = images[1]["ImageId"]
    print(json.dumps({"key_id": key["AccessKeyId"], "secret": key["SecretAccessKey"],
                      "image_id": image, "other_image_id": other}))


def instances(endpoint, key_id, secret, region="us-east-1"):
    ec2 = client("ec2", endpoint, key_id, secret, region)
    out = []
    for r in ec2.describe_instances()["Reservations"]:
        for i in r["Instances"]:
            attr = ec2.describe_instance_attribute(InstanceId=i["InstanceId"], Attribute="userData")
            data = attr.get("UserData", {}).get("Value")
            volumes = []
            for m in i.get("BlockDeviceMappings", []):
                vid = m.get("Ebs", {}).get("VolumeId")
                if not vid:
                    continue
                for v in ec2.describe_volumes(VolumeIds=[vid])["Volumes"]:
                    volumes.append({"device": m["DeviceName"], "size": v["Size"],
                                    "type": v["VolumeType"], "iops": v.get("Iops")})
            out.append({
                "id": i["InstanceId"],
                "type": i["InstanceType"],
                "state": i["State"]["Name"],
                "lifecycle": i.get("InstanceLifecycle", "normal"),
                "zone": i["Placement"]["AvailabilityZone"],
                "image": i["ImageId"],
                "tags": {t["Key"]: t["Value"] for t in i.get("Tags", [])},
                "user_data": base64.b64decode(data).decode() if data else "",
                "volumes": volumes,
                "groups": [g["GroupId"] for g in i.get("SecurityGroups", [])],
            })
    print(json.dumps(out))


def groups(endpoint, key_id, secret, region="us-east-1"):
    ec2 = client("ec2", endpoint, key_id, secret, region)
    out = []
    for g in ec2.describe_security_groups()["SecurityGroups"]:
        out.append({
            "id": g["GroupId"],
            "name": g["GroupName"],
            "tags": {t["Key"]: t["Value"] for t in g.get("Tags", [])},
            "ingress": [[p.get("FromPort"), p.get("ToPort"), r["CidrIp"]]
                        for p in g.get("IpPermissions", []) if p.get("IpProtocol") == "tcp"
                        for r in p.get("IpRanges", [])],
        })
    print(json.dumps(out))


def bucket(endpoint, name):
    client("s3", endpoint).create_bucket(Bucket=name)
    print(json.dumps({"bucket": name}))


def objects(endpoint, name):
    s3 = client("s3", endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=name).get("Contents", [])]
    print(json.dumps(keys))


def buckets(endpoint):
    print(json.dumps([b["Name"] for b in client("s3", endpoint).list_buckets()["Buckets"]]))


def etags(endpoint, name):
    s3 = client("s3", endpoint)
    objs = s3.list_objects_v2(Bucket=name).get("Contents", [])
    print(json.dumps({o["Key"]: o["ETag"].strip('"') for o in objs}))


def get(endpoint, name, key, path):
    client("s3", endpoint).download_file(name, key, path)
    print(json.dumps({"key": key}))


def put(endpoint, name, key, path):
    client("s3", endpoint).upload_file(path, name, key)
    print(json.dumps({"key": key}))


if __name__ == "__main__":
    {"setup": setup, "instances": instances, "bucket": bucket, "objects": objects,
     "etags": etags, "buckets": buckets, "put": put, "get": get, "groups": groups}[sys.argv[1]](*sys.argv[2:])
